"""Faults: dead Nodes, a dead distributor, Redis restarts and outages, garbage in Redis,
forged pub/sub messages, requests nobody takes, and clients that hang up.

Every test runs the real pieces (uvicorn, the distributor, Nodes in-process or in child
processes, a private redis-server) and bounds every wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from minidasgi import Node, create_distributor, create_path_distributor, wire

from . import apps
from .faultproxy import FaultProxy
from .redis_server import RedisFactory, RedisServer, calls, client_list
from .stack import NodeProcess, distributor_process, poll, redis_keys, run_node, serve_app

pytestmark = pytest.mark.timeout(60)

KILL_NOTICED = 5.0  # seconds: a dead peer must be noticed well within this (about 1-3 s)


async def _start_process(node: NodeProcess) -> NodeProcess:
    """Start a Node child process without blocking this event loop."""
    return await asyncio.to_thread(node.start)


async def _kill_process(node: NodeProcess) -> None:
    await asyncio.to_thread(node.kill)


async def _stop_process(node: NodeProcess) -> None:
    await asyncio.to_thread(node.stop)


@contextlib.asynccontextmanager
async def _node_processes(*nodes: NodeProcess) -> AsyncIterator[None]:
    try:
        for node in nodes:
            await _start_process(node)
        yield
    finally:
        for node in nodes:
            await _stop_process(node)


@contextlib.asynccontextmanager
async def _node_task(node: Node) -> AsyncIterator[asyncio.Task[None]]:
    """Run a Node without waiting for it to start (for when Redis is down)."""
    task = asyncio.ensure_future(node.serve())
    try:
        yield task
    finally:
        node.stop()
        try:
            await asyncio.wait_for(task, 15)
        except asyncio.TimeoutError:
            task.cancel()


# 1. kill -9 of a Node process -------------------------------------------------------------


async def test_node_killed_mid_response_aborts_the_stream(redis_server: RedisServer) -> None:
    app = create_distributor(url=redis_server.url, key="slow")
    loop = asyncio.get_running_loop()
    node = NodeProcess(redis_server.url, "slow", "apps:slow")
    async with serve_app(app) as base, _node_processes(node):
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            async with client.stream("GET", "/?100") as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                seen = [await asyncio.wait_for(anext(lines), 5) for _ in range(3)]
                assert seen == ["0", "1", "2"]
                await _kill_process(node)
                killed = loop.time()

                async def rest() -> list[str]:
                    return [line async for line in lines]

                with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                    await asyncio.wait_for(rest(), 10)
                elapsed = loop.time() - killed
    assert elapsed < KILL_NOTICED, f"the client waited {elapsed:.2f} s for the abort"
    assert redis_keys(redis_server) == []


async def test_node_killed_before_the_response_gives_502(redis_server: RedisServer) -> None:
    app = create_distributor(url=redis_server.url, key="sleepy")
    loop = asyncio.get_running_loop()
    node = NodeProcess(redis_server.url, "sleepy", "apps:sleepy")
    async with serve_app(app) as base, _node_processes(node):
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            request = asyncio.ensure_future(client.get("/?30"))
            # Wait until the Node has acked: the exchange knows its Node.
            assert await poll(_acked(app), 5), "the Node never acked the request"
            await _kill_process(node)
            killed = loop.time()
            response = await asyncio.wait_for(request, 10)
            elapsed = loop.time() - killed
    assert response.status_code == 502
    assert elapsed < KILL_NOTICED, f"the client waited {elapsed:.2f} s for the 502"
    assert redis_keys(redis_server) == []


def _acked(distributor: Any, count: int = 1) -> Any:
    """A check: at least ``count`` exchanges of ``distributor`` were acked by a Node."""

    def check() -> bool:
        exchanges = list(distributor._exchanges.values())
        return sum(e.node is not None for e in exchanges) >= count

    return check


# 2. Requests on another Node are untouched ------------------------------------------------


async def test_killing_one_node_leaves_another_alone(redis_server: RedisServer) -> None:
    app = create_path_distributor(url=redis_server.url, routes={"^/a": "A", "^/b": "B"})
    loop = asyncio.get_running_loop()
    node_a = NodeProcess(redis_server.url, "A", "apps:sleepy")
    node_b = NodeProcess(redis_server.url, "B", "apps:sleepy")
    async with serve_app(app) as base, _node_processes(node_a, node_b):
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            on_a = asyncio.ensure_future(client.get("/a?30"))
            on_b = asyncio.ensure_future(client.get("/b?2"))
            assert await poll(_acked(app, 2), 5), "both Nodes should ack"
            await _kill_process(node_a)
            killed = loop.time()
            response_a = await asyncio.wait_for(on_a, 10)
            assert loop.time() - killed < KILL_NOTICED
            response_b = await asyncio.wait_for(on_b, 10)
            # Node B still serves new requests too.
            again = await client.get("/b?0")
    assert response_a.status_code == 502
    assert response_b.status_code == 200 and response_b.text == "slept"
    assert again.status_code == 200
    assert redis_keys(redis_server) == []


# 3. A distributor that dies -------------------------------------------------------------


async def test_distributor_killed_mid_request_disconnects_the_app(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    loop = asyncio.get_running_loop()
    seen: dict[str, tuple[str, float]] = {}
    running: dict[str, asyncio.Event] = {"listen": asyncio.Event(), "sleep": asyncio.Event()}

    async def waiting_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        mode = scope["path"].strip("/")
        try:
            first = await receive()
            assert first["type"] == "http.request"
            running[mode].set()
            if mode == "listen":  # waits on receive(): should see http.disconnect
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        seen[mode] = ("disconnect", loop.time())
                        return
            else:  # ignores receive(): should be cancelled
                await asyncio.sleep(30)
                seen[mode] = ("slept through", loop.time())
        except asyncio.CancelledError:
            seen[mode] = ("cancelled", loop.time())
            raise

    node = Node(url=redis_server.url, app=waiting_app, key="front", lifespan="off")
    async with distributor_process(redis_server.url, "front") as (base, process):
        async with run_node(node), httpx.AsyncClient(base_url=base, timeout=10) as client:
            requests = [
                asyncio.ensure_future(client.get("/listen")),
                asyncio.ensure_future(client.get("/sleep")),
            ]
            await asyncio.wait_for(
                asyncio.gather(running["listen"].wait(), running["sleep"].wait()), 10
            )
            assert node.in_flight == 2
            process.kill()
            killed = loop.time()
            done = await poll(lambda: len(seen) == 2, killed + 8 - loop.time())
            for request in requests:
                with pytest.raises(httpx.HTTPError):
                    await asyncio.wait_for(request, 10)
            assert done, f"the app did not notice the dead distributor: {seen}"
            assert await poll(lambda: node.in_flight == 0, 3)
    assert seen["listen"][0] == "disconnect"
    assert seen["sleep"][0] == "cancelled"
    for mode, (_, when) in seen.items():
        assert when - killed < KILL_NOTICED, f"{mode}: noticed after {when - killed:.2f} s"
    assert redis_keys(redis_server) == []


# 4. Graceful SIGTERM of a Node under load -------------------------------------------------


async def test_sigterm_finishes_requests_in_flight_and_takes_no_more(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "requests.log"
    monkeypatch.setenv("MINIDASGI_TEST_LOG", str(log))  # inherited by the Node process
    app = create_distributor(url=redis_server.url, key="work")
    # The request sent after the SIGTERM goes through a distributor that waits 1 s for an ack.
    impatient = create_distributor(url=redis_server.url, key="work", worker_timeout=1)
    loop = asyncio.get_running_loop()
    node = NodeProcess(redis_server.url, "work", "apps:logged_sleepy", "--health-port", "0")
    async with serve_app(app) as base, serve_app(impatient) as impatient_base:
        await _start_process(node)
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=base, timeout=10, limits=limits) as client:
            requests = [
                asyncio.ensure_future(client.get("/?1", headers={"x-request-id": f"r{i}"}))
                for i in range(20)
            ]
            assert await poll(_acked(app, 20), 5), "20 acks expected"
            # All 20 running when the SIGTERM comes.
            assert await poll(lambda: log.exists() and log.read_text().count("start ") == 20, 10)
            assert node.process is not None
            node.process.send_signal(signal.SIGTERM)
            assert log.read_text().count("end ") == 0, "a request ended before the SIGTERM"

            async def stopped_popping() -> bool:
                # Stopping (not ready), it pops no more; the pop under way was woken (CLIENT
                # UNBLOCK) once no connection waits in one.
                ready = await client.get(f"http://127.0.0.1:{node.health_port}/-/readyz")
                blocked = any("b" in c["flags"] for c in client_list(redis_server))
                return ready.status_code == 503 and not blocked

            assert await poll(stopped_popping, 10), "the Node still pops"
            start = loop.time()
            late = await client.get(impatient_base + "/?0", headers={"x-request-id": "late"})
            late_elapsed = loop.time() - start
            responses = await asyncio.wait_for(asyncio.gather(*requests), 10)
            try:
                code = await asyncio.wait_for(asyncio.to_thread(node.process.wait), 30)
            finally:
                await _stop_process(node)
    assert [r.status_code for r in responses] == [200] * 20
    assert sorted(r.text for r in responses) == sorted(f"slept r{i}" for i in range(20))
    assert code == 0
    assert late.status_code == 405, late.text
    assert 0.9 < late_elapsed < 5
    lines = log.read_text().splitlines()
    for i in range(20):
        assert lines.count(f"start r{i}") == 1, f"r{i} ran {lines.count(f'start r{i}')} times"
        assert lines.count(f"end r{i}") == 1
    assert "start late" not in lines
    assert redis_keys(redis_server) == []  # the late request was taken back


# 5. Redis restart under traffic -----------------------------------------------------------


@pytest.mark.parametrize("outage", [0.0, 1.0], ids=["restart", "one-second-outage"])
async def test_redis_restart_under_traffic(redis_server: RedisServer, outage: float) -> None:
    app = create_distributor(url=redis_server.url, key="hello")
    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    loop = asyncio.get_running_loop()
    results: list[tuple[float, float, Any]] = []
    stop = asyncio.Event()

    async def traffic(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            start = loop.time()
            try:
                outcome: Any = (await client.get("/", timeout=10)).status_code
            except httpx.HTTPError as exc:
                outcome = repr(exc)
            results.append((start, loop.time(), outcome))
            await asyncio.sleep(0.02)

    async with serve_app(app) as base, run_node(node) as running:
        async with httpx.AsyncClient(base_url=base) as client:
            background = asyncio.ensure_future(traffic(client))
            try:
                assert await poll(lambda: len(results) >= 5, 10), "no traffic before the fault"
                assert all(r[2] == 200 for r in results)
                down = float("inf")
                if outage:
                    await asyncio.to_thread(redis_server.stop)
                    down = loop.time()
                    await asyncio.sleep(outage)
                    await asyncio.to_thread(redis_server.start)
                else:
                    await asyncio.to_thread(redis_server.restart)
                back = loop.time()

                async def recovered() -> bool:
                    return any(s > back and o == 200 for s, _, o in results)

                ok = await poll(recovered, back + 8 - loop.time())
                recovered_after = min(
                    (e for s, e, o in results if s > back and o == 200), default=float("inf")
                )
                await asyncio.sleep(0.5)
            finally:
                stop.set()
                await asyncio.wait_for(background, 15)
            assert ok, f"no success after Redis came back: {results[-5:]}"
            # And it stays up: a burst after recovery all succeeds.
            after = await asyncio.gather(*(client.get("/", timeout=10) for _ in range(20)))
        assert running.in_flight == 0
    outcomes = {o for _, _, o in results}
    assert outcomes <= {200, 502, 503}, f"unexpected outcomes: {outcomes}"
    if outage:  # requests made while Redis was down are refused at once
        during = [(e - s, o) for s, e, o in results if down <= s <= back]
        assert during, "no request was made while Redis was down"
        assert {o for _, o in during} <= {502, 503}, during
        assert max(d for d, _ in during) < 1, during
    assert max(e - s for s, e, _ in results) < 10
    assert recovered_after - back < 3.5, f"recovered {recovered_after - back:.2f} s after"
    assert [r.status_code for r in after] == [200] * 20
    assert redis_keys(redis_server) == []


# 6. Redis unreachable at start ----------------------------------------------------------


async def test_redis_unreachable_at_start(redis_server: RedisServer) -> None:
    redis_server.stop()
    app = create_distributor(url=redis_server.url, key="hello", startup_wait=0.5)
    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    loop = asyncio.get_running_loop()
    async with serve_app(app) as base, _node_task(node) as serving:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            for _ in range(3):
                start = loop.time()
                response = await client.get("/")
                assert response.status_code == 503
                assert loop.time() - start < 1
            await asyncio.to_thread(redis_server.start)
            back = loop.time()
            last: list[int] = []

            async def served() -> bool:
                last.append((await client.get("/")).status_code)
                return last[-1] == 200

            assert await poll(served, back + 6 - loop.time(), 0.1), f"still failing: {last[-5:]}"
            assert set(last) <= {200, 503, 405}, last
            assert loop.time() - back < 6
            assert not serving.done()
            assert (await client.get("/")).text == "Hello World!"
    assert redis_keys(redis_server) == []


async def test_requests_get_503_at_once_when_redis_goes_silent(
    redis_factory: RedisFactory,
) -> None:
    """The command connection is reset (RST) and new connections to Redis are accepted but
    never answered (a hung Redis, a path gone silent), with ``connect_timeout=3`` and a
    password (AUTH on top of the connect): requests get 503 at once, not after the reconnect
    attempt's bound (they waited for it, ``wait_reopened`` armed by any end). None of them
    waits at all, not even ``REOPEN_WAIT``: a reset is no clean close."""
    server = redis_factory(password="s3cret")
    with FaultProxy(server.port) as proxy:
        distributor = create_distributor(
            url=proxy.url("s3cret") + "/?connect_timeout=3", key="gone"
        )
        async with serve_app(distributor) as base:
            async with httpx.AsyncClient(base_url=base, timeout=1) as client:
                assert await poll(lambda: distributor.ready, 10)
                assert distributor._client is not None
                ended = distributor._client.connection()
                proxy.stall_new()
                proxy.reset()  # the command connection and the subscriber
                await asyncio.wait_for(ended.wait_closed(), 10)
                requests = [asyncio.ensure_future(client.get("/x")) for _ in range(5)]
                waiting: list[int] = []
                while not all(r.done() for r in requests):
                    waiting.append(distributor._reopen_waiting)
                    await asyncio.sleep(0.01)
                replies = [r.result() for r in requests]
                assert [(r.status_code, r.text) for r in replies] == [
                    (503, "the request queue (Redis) is unreachable\n")
                ] * 5
                assert max(waiting) == 0, waiting  # none waited, if only REOPEN_WAIT
                proxy.resume()


async def test_a_connection_redis_closes_is_waited_for_briefly_and_within_max_in_flight(
    redis_factory: RedisFactory,
) -> None:
    """Redis closes the command connection cleanly (``CLIENT KILL``, as its idle ``timeout``
    does) and the reconnect finds it silent (new connections stalled, ``connect_timeout=3``):
    requests wait for that attempt at most ``REOPEN_WAIT`` (0.25 s), then get 503, well
    within the client's timeout of 1 s; and no more of them wait than ``max_in_flight``
    allows (the rest are answered at once)."""
    server = redis_factory(password="s3cret")
    with FaultProxy(server.port) as proxy:
        distributor = create_distributor(
            url=proxy.url("s3cret") + "/?connect_timeout=3", key="gone", max_in_flight=2
        )
        waiting: list[int] = []
        async with serve_app(distributor) as base:
            async with httpx.AsyncClient(base_url=base, timeout=1) as client:
                assert await poll(lambda: distributor.ready, 10)
                assert distributor._client is not None
                ended = distributor._client.connection()
                proxy.stall_new()
                server.command("CLIENT", "KILL", "TYPE", "normal")
                await asyncio.wait_for(ended.wait_closed(), 10)
                assert ended.closed_by_server
                requests = [asyncio.ensure_future(client.get("/x")) for _ in range(5)]
                while not all(r.done() for r in requests):
                    waiting.append(distributor._reopen_waiting)
                    await asyncio.sleep(0.01)
                replies = [r.result() for r in requests]
                assert [r.status_code for r in replies] == [503] * 5
                assert max(waiting) == 2, waiting  # some waited, no more than allowed
                proxy.resume()


# 7. Garbage in a queue -------------------------------------------------------------------


async def test_garbage_in_the_queue_is_dropped(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="minidasgi.node")
    ran: list[str] = []

    async def recorder(scope: Any, receive: Any, send: Any) -> None:
        ran.append(scope["path"])
        await apps.hello(scope, receive, send)

    app = create_distributor(url=redis_server.url, key="K")
    node = Node(url=redis_server.url, app=recorder, key="K", lifespan="off")

    def envelope(scope: dict[str, Any], reply: str = "minidasgi:0:dist:nobody") -> bytes:
        return wire.Envelope(
            id=wire.new_request_id(),
            reply=reply,
            deadline=time.time() + 60,
            scope=scope,
            events=[{"type": "http.request", "body": b"", "more_body": False}],
        ).encode()

    http_scope = {"type": "http", "path": "/forged", "headers": [], "query_string": b""}
    valid = envelope(http_scope)
    garbage = [
        os.urandom(200),
        b"",
        valid[: len(valid) // 2],
        bytes([99]) + valid[1:],
        envelope({"type": "lifespan"}),
        b"\x01" + b"l\xff\xff\xff\xff",  # a forged count far beyond the data
    ]
    async with serve_app(app) as base, run_node(node):
        for item in garbage:
            await asyncio.to_thread(redis_server.command, "LPUSH", "K", item)
        # A well-formed envelope whose distributor is not listening may run, as a request
        # whose client left does when served directly (the Node runs without waiting for the
        # ack to land); its PUBLISH reaching nobody disconnects it.
        await asyncio.to_thread(redis_server.command, "LPUSH", "K", valid)
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            response = await client.get("/real")
            assert response.status_code == 200 and response.text == "Hello World!"
            assert (await client.get("/again")).status_code == 200
    assert [path for path in ran if path != "/forged"] == ["/real", "/again"]
    dropped = [
        r
        for r in caplog.records
        if r.name == "minidasgi.node" and r.levelno >= logging.WARNING and "malformed" in r.message
    ]
    assert len(dropped) == len(garbage), [r.message for r in caplog.records]
    assert redis_keys(redis_server) == []


# 8. Forged messages on the reply channels ---------------------------------------------------


async def test_forged_reply_messages_do_not_disturb_a_request(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    release = asyncio.Event()

    app = create_distributor(url=redis_server.url, key="held")
    node = Node(url=redis_server.url, app=apps.held(release), key="held", lifespan="off")
    async with serve_app(app) as base, run_node(node):
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            request = asyncio.ensure_future(client.get("/"))
            assert await poll(_acked(app), 5)
            (real_id,) = list(app._exchanges)
            start = {"type": "http.response.start", "status": 500, "headers": []}
            body = {"type": "http.response.body", "body": b"forged", "more_body": False}
            forged = [
                os.urandom(64),
                b"",
                b"\x01" + b"d\xff\xff\xff\xff",
                wire.pack(wire.SEND, "unknownid", [start, body]),
                wire.pack(wire.ACK, "unknownid2", node.channel),
                wire.pack(wire.ACK, "unknownid3", 12345),
                wire.pack(wire.DONE, "unknownid4", True),
                wire.pack(wire.CREDIT, "unknownid5", 10**6),
                wire.pack(wire.EVENT, real_id, {"type": "http.disconnect"}),
                wire.pack(wire.CANCEL, real_id),
                wire.PING_MESSAGE,
            ]
            for message in forged:
                receivers = await asyncio.to_thread(
                    redis_server.command, "PUBLISH", app.channel, message
                )
                assert receivers == 1
            # Garbage on the Node's channel too.
            for message in (os.urandom(64), wire.pack(wire.EVENT, "unknownid", {"x": 1})):
                await asyncio.to_thread(redis_server.command, "PUBLISH", node.channel, message)
            await asyncio.sleep(0.3)
            assert not request.done()
            release.set()
            response = await asyncio.wait_for(request, 10)
            assert response.status_code == 200
            assert response.content == b"part1,part2"
            again = await client.get("/")  # released: answers at once
            assert again.content == b"part1,part2"
    warnings = [r.message for r in caplog.records if r.name == "minidasgi.distributor"]
    assert any("malformed" in m for m in warnings), warnings
    assert redis_keys(redis_server) == []


def _frame_of(message: bytes, count: int) -> bytes:
    """A batch frame of ``count`` copies of ``message``."""
    return wire.batch_frame([message] * count)


async def test_a_forged_batch_of_many_tiny_messages_is_dropped_cheaply_and_logged_once(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch frame is bounded in bytes, not in messages: one forged PUBLISH of a frame of
    262,143 one-byte messages was split into as many views and each logged as a malformed
    message, which held the Node's loop for 8 s. A frame of messages shorter than any message
    is refused whole, and the rest of a batch after a malformed message is dropped with it,
    logged once: a peer of ours never sends one."""
    caplog.set_level(logging.WARNING)
    release = asyncio.Event()
    app = create_distributor(url=redis_server.url, key="held")
    node = Node(url=redis_server.url, app=apps.held(release), key="held", lifespan="off")
    async with serve_app(app) as base, run_node(node):
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            request = asyncio.ensure_future(client.get("/"))
            assert await poll(_acked(app), 5)
            tiny = _frame_of(b"\x01", 20_000)  # five bytes a message
            garbage = _frame_of(b"\x01" + b"\xff" * 31, 20_000)  # long enough, malformed
            for channel in (node.channel, app.channel):
                for frame in (tiny, garbage):
                    receivers = await asyncio.to_thread(
                        redis_server.command, "PUBLISH", channel, frame
                    )
                    assert receivers == 1
            release.set()
            response = await asyncio.wait_for(request, 10)
            assert (response.status_code, response.content) == (200, b"part1,part2")
    for name in ("minidasgi.node", "minidasgi.distributor"):
        dropped = [
            r.message
            for r in caplog.records
            if r.name == name and r.levelno >= logging.WARNING and "malformed" in r.message
        ]
        assert 2 <= len(dropped) <= 3, (name, len(dropped), dropped[:4])
    assert redis_keys(redis_server) == []


async def test_a_forged_batch_of_unexpected_kinds_is_dropped_and_logged_once(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Well-formed messages of a kind the receiver never gets from its peer (an EVENT to a
    distributor, an ACK to a Node), for a live request, forged in one PUBLISH of 10,000: each
    was logged ("dropped an unexpected ... message"), 10,000 lines a PUBLISH. They are dropped
    as malformed messages are: one line for the first, one for the rest of its batch."""
    caplog.set_level(logging.WARNING)
    release = asyncio.Event()
    app = create_distributor(url=redis_server.url, key="held")
    node = Node(url=redis_server.url, app=apps.held(release), key="held", lifespan="off")
    async with serve_app(app) as base, run_node(node):
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            request = asyncio.ensure_future(client.get("/"))
            assert await poll(_acked(app), 5)
            (request_id,) = app._exchanges
            assert list(node._jobs) == [request_id]
            disconnect = {"type": "http.disconnect"}
            forged = {
                app.channel: _frame_of(wire.pack(wire.EVENT, request_id, disconnect), 10_000),
                node.channel: _frame_of(wire.pack(wire.ACK, request_id, node.channel), 10_000),
            }
            for channel, frame in forged.items():
                receivers = await asyncio.to_thread(redis_server.command, "PUBLISH", channel, frame)
                assert receivers == 1

            def dropped_by(name: str) -> list[str]:
                return [
                    r.message for r in caplog.records if r.name == name and "dropped" in r.message
                ]

            # Read before the request ends (PUBLISH returning is no proof of that): the same
            # messages for a request already ended are ignored, as they should be.
            names = ("minidasgi.node", "minidasgi.distributor")
            assert await poll(lambda: all(dropped_by(name) for name in names), 5)
            release.set()
            response = await asyncio.wait_for(request, 10)
            assert (response.status_code, response.content) == (200, b"part1,part2")
    for name in names:
        dropped = dropped_by(name)
        assert len(dropped) == 2, (name, len(dropped), dropped[:4])
        assert "unexpected" in dropped[0]
        assert "dropped the 9999 messages after it in its batch" in dropped[1]
    assert redis_keys(redis_server) == []


async def test_a_forged_event_or_credit_of_the_wrong_shape_is_logged_as_malformed(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An EVENT whose argument is not an event, a CREDIT whose argument is not a number, for a
    live request on a Node: kinds a distributor does send, so not unexpected, but malformed.
    Each is dropped and said so; the request completes."""
    caplog.set_level(logging.WARNING, logger="minidasgi.node")
    release = asyncio.Event()
    app = create_distributor(url=redis_server.url, key="held")
    node = Node(url=redis_server.url, app=apps.held(release), key="held", lifespan="off")
    async with serve_app(app) as base, run_node(node):
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            request = asyncio.ensure_future(client.get("/"))
            assert await poll(_acked(app), 5)
            (request_id,) = app._exchanges
            for forged in (
                wire.pack(wire.EVENT, request_id, "not an event"),
                wire.pack(wire.CREDIT, request_id, "not a number"),
            ):
                receivers = await asyncio.to_thread(
                    redis_server.command, "PUBLISH", node.channel, forged
                )
                assert receivers == 1

            def dropped() -> list[str]:
                return [
                    r.message
                    for r in caplog.records
                    if r.name == "minidasgi.node" and "dropped" in r.message
                ]

            assert await poll(lambda: len(dropped()) == 2, 5), dropped()
            release.set()
            response = await asyncio.wait_for(request, 10)
            assert (response.status_code, response.content) == (200, b"part1,part2")
    assert dropped() == [
        f"dropped a malformed {kind!r} message for request {request_id}"
        for kind in (wire.EVENT, wire.CREDIT)
    ]
    assert redis_keys(redis_server) == []


# 9. Many requests and no Node ---------------------------------------------------------------


REQUESTS = 2_000


async def test_many_requests_without_a_node(redis_server: RedisServer) -> None:
    distributor = create_distributor(url=redis_server.url, key="nobody", worker_timeout=2)
    loop = asyncio.get_running_loop()
    answered: list[float] = []  # seconds from the request's arrival to the distributor's answer

    async def app(scope: Any, receive: Any, send: Any) -> None:
        arrived = loop.time()

        async def timed_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                answered.append(loop.time() - arrived)
            await send(message)

        await distributor(scope, receive, timed_send if scope["type"] == "http" else send)

    async def timed(port: int, i: int) -> tuple[int, float]:
        # A bare HTTP/1.1 client: httpx would spend seconds on 2,000 connections.
        start = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET /{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            status = int((await reader.readline()).split()[1])
            await reader.readuntil(b"\r\n\r\n")
        finally:
            writer.close()
        return status, loop.time() - start

    async with serve_app(app, backlog=4096) as base:
        port = int(base.rsplit(":", 1)[1])
        results = await asyncio.wait_for(
            asyncio.gather(*(timed(port, i) for i in range(REQUESTS))), 60
        )
    assert [status for status, _ in results] == [405] * REQUESTS
    # The distributor answers each at about worker_timeout...
    assert len(answered) == REQUESTS
    assert min(answered) > 1.9 and max(answered) < 5, (min(answered), max(answered))
    # ...and the clients, which share this event loop with uvicorn and the distributor and
    # spend a while on 2,000 connections, get the answers soon after.
    elapsed = [e for _, e in results]
    assert min(elapsed) > 1.9 and max(elapsed) < 15, (min(elapsed), max(elapsed))
    assert redis_keys(redis_server) == []
    ran: list[str] = []

    async def recorder(scope: Any, receive: Any, send: Any) -> None:
        ran.append(scope["path"])
        await apps.hello(scope, receive, send)

    node = Node(url=redis_server.url, app=recorder, key="nobody", lifespan="off")
    async with run_node(node):
        # Until its pop waits at Redis: it found nothing left to run (a fixed 1 s before).
        assert await poll(lambda: any("b" in c["flags"] for c in client_list(redis_server)), 10)
    assert ran == []
    assert redis_keys(redis_server) == []


# 10. Client disconnect reaches the app ------------------------------------------------------


async def test_client_disconnect_reaches_the_app(redis_server: RedisServer) -> None:
    loop = asyncio.get_running_loop()
    disconnected = asyncio.Event()
    events: list[str] = []

    async def listener(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
        while True:
            message = await receive()
            events.append(message["type"])
            if message["type"] == "http.disconnect":
                disconnected.set()
                return

    app = create_distributor(url=redis_server.url, key="listen")
    node = Node(url=redis_server.url, app=listener, key="listen", lifespan="off")
    async with serve_app(app) as base, run_node(node):
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            async with client.stream("GET", "/") as response:
                lines = response.aiter_lines()
                assert await asyncio.wait_for(anext(lines), 5) == "first"
            closed = loop.time()  # leaving the block mid-body closes the connection
            await asyncio.wait_for(disconnected.wait(), 5)
            elapsed = loop.time() - closed
        assert await poll(lambda: node.in_flight == 0, 3)
    assert events == ["http.request", "http.disconnect"]
    assert elapsed < 2, f"the app saw the disconnect after {elapsed:.2f} s"
    assert redis_keys(redis_server) == []


# 11. A stop during a Redis outage ----------------------------------------------------------

NODE_USER, NODE_SECRET = "node", "node-s3cret"
STOP_WITHIN = 5.0  # seconds: a stop must not wait out pop_timeout (20 s); ~0.6 s measured


@pytest.mark.parametrize("down", ["before the start", "while popping", "the subscriber only"])
async def test_a_node_stops_at_once_while_redis_is_away(
    redis_factory: RedisFactory, down: str
) -> None:
    """A Node whose Redis is away waits, before it pops again, for its pop connection and
    then for its publisher and subscriber (each wait up to ``pop_timeout``): a ``stop()``
    must end those waits at once, not when they time out. 'the subscriber only': the pop
    connection stays and the subscriber may not subscribe (an ACL change), so the pop loop,
    woken by an item, waits for the subscriber."""
    redis = redis_factory(acl_users={NODE_USER: NODE_SECRET})
    url = f"redis://{NODE_USER}:{NODE_SECRET}@127.0.0.1:{redis.port}"
    node = Node(url=url, app=apps.hello, key="hello", pop_timeout=20.0)
    if down == "before the start":
        redis.stop()
    serving = asyncio.ensure_future(node.serve())
    try:
        if down == "before the start":
            await asyncio.sleep(0.5)  # it waits for Redis to come up
        else:
            await asyncio.wait_for(node.wait_started(), 10)
            publisher, subscriber = node._publisher, node._subscriber
            assert publisher is not None and subscriber is not None
            if down == "while popping":
                await asyncio.to_thread(redis.stop)
                # The pop loop has seen its connection go, and waits for a new one.
                assert await poll(lambda: not publisher.connected, 10)
            else:
                assert redis.command("ACL", "SETUSER", NODE_USER, "resetchannels") == b"OK"
                redis.command("CLIENT", "KILL", "USER", NODE_USER, "TYPE", "pubsub")
                assert await poll(lambda: not subscriber.connected, 10)
                # Wakes the blocked pop (an item that is no request is dropped): the loop
                # then waits for the subscriber before it pops again.
                redis.command("LPUSH", "hello", "not an envelope")
                assert await poll(lambda: redis.command("LLEN", "hello") == 0, 10)
            await asyncio.sleep(0.5)
        assert not serving.done()
        node.stop()
        await asyncio.wait_for(asyncio.shield(serving), STOP_WITHIN)
    finally:
        if not serving.done():
            serving.cancel()


@pytest.mark.requires_server("7.0")  # commandstats by subcommand (client|unblock)
async def test_a_node_stops_at_once_while_its_pop_is_on_its_way(
    redis_server: RedisServer,
) -> None:
    """A stop's CLIENT UNBLOCK, sent on the publishing connection, may reach Redis before
    the pop written just before it on the pop connection (a slow link, a short stall):
    it wakes nothing then, and the pop, blocking once it arrives, held the stop for its
    whole ``pop_timeout``. Reproduced with the pop connection's way up held by a proxy while
    the stop is asked, then let through: the stop must still end at once."""
    with FaultProxy(redis_server.port) as proxy:
        node = Node(url=proxy.url(), app=apps.hello, key="hello", pop_timeout=20.0)
        serving = asyncio.ensure_future(node.serve())
        try:
            await asyncio.wait_for(node.wait_started(), 10)

            def blocked() -> list[dict[str, str]]:  # the Node's pop, waiting at Redis
                proxied = {c.upstream_port for c in proxy.connections()}
                return [
                    c
                    for c in client_list(redis_server)
                    if "b" in c["flags"] and int(c["addr"].rsplit(":", 1)[1]) in proxied
                ]

            assert await poll(lambda: len(blocked()) == 1, 10)
            (pop,) = blocked()
            link = proxy.connection_to(int(pop["addr"].rsplit(":", 1)[1]))
            link.stall(up=True, down=False)
            # Woken as if timed out, the pop loop sends its next pop: held in the proxy.
            assert redis_server.command("CLIENT", "UNBLOCK", pop["id"]) == 1
            assert await poll(lambda: link.held_up() > 0, 10), "no next pop sent"
            node.stop()
            # The stop's UNBLOCK reaches Redis first (the test's own was the first one),
            # waking nothing: the held pop is not there yet.
            assert await poll(lambda: calls(redis_server, "client|unblock") >= 2, 10)
            assert not serving.done()
            link.resume()
            await asyncio.wait_for(asyncio.shield(serving), STOP_WITHIN)
        finally:
            if not serving.done():
                serving.cancel()


# 12. A response's last message lost as it leaves -----------------------------------------


async def test_a_last_message_lost_as_it_leaves_leaves_the_job_lost_not_finished(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The Node's publishing connection is down (killed, its reconnection stalled in the
    fault proxy) when the app sends its response, of one piece too large to wait for company
    (over ``wire.MAX_BATCH_SIZE``): its batch fails as it leaves, inside the post. The job
    must end as a lost one (disconnected, its GONE due), not as one whose distributor was
    told everything. Before, the outbox told the loss from inside the post, and the job,
    marked lost, was marked finished right after."""
    caplog.set_level(logging.WARNING, logger="minidasgi.node")
    release = asyncio.Event()
    jobs: list[Any] = []
    body = b"x" * (wire.MAX_BATCH_SIZE + 64 * 1024)  # one piece (large pieces: 1 MiB)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await asyncio.wait_for(release.wait(), 20)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    # Database 1: a connection's handshake then SELECTs it, so a reconnection waits for a
    # reply, which a stalled flow never brings (without one, it is connected at once).
    distributor = create_distributor(url=f"{redis_server.url}/1", key="lastlost")
    with FaultProxy(redis_server.port) as proxy:
        # pop_timeout 1 s: its stop unblocks its BRPOP through the publishing connection,
        # which this test leaves reconnecting, so the BRPOP's own timeout ends it (5 s).
        node = Node(url=f"{proxy.url()}/1", app=app, key="lastlost", lifespan="off", pop_timeout=1)
        async with (
            serve_app(distributor) as base,
            run_node(node),
            httpx.AsyncClient(base_url=base, timeout=30) as client,
        ):
            request = asyncio.ensure_future(client.get("/"))
            try:
                assert await poll(lambda: node.in_flight == 1, 10)
                jobs.extend(node._jobs.values())
                publisher: Any = node._publisher  # a Client: one Redis server
                # The Node's publishing connection, known in the proxy by the Node's port.
                port = publisher.connection()._transport.get_extra_info("sockname")[1]
                (flow,) = [c for c in proxy.connections() if c.client.getpeername()[1] == port]
                proxy.stall_new()  # its reconnection waits in the proxy
                flow.reset()  # a TCP RST, the others untouched
                assert await poll(lambda: not publisher.connected, 10)
                release.set()
                assert await poll(lambda: node.in_flight == 0, 10)
            finally:
                proxy.resume()
                request.cancel()
                with contextlib.suppress(BaseException):
                    await request
    (job,) = jobs
    assert job.gone and not job.finished, (job.gone, job.finished, job.why)
    assert job.why == "the distributor did not get the end of the response"
    lost = [r for r in caplog.records if "did not get the end of the response" in r.getMessage()]
    assert len(lost) == 1, caplog.text
