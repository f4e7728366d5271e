"""Hygiene: a constant number of Redis connections per process whatever the load, nothing
left behind in Redis after any kind of request, and nothing left connected after a stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from minidasgi import Node, create_distributor, create_path_distributor

from . import apps
from .redis_server import RedisServer
from .stack import redis_keys, run_node, serve_app

pytestmark = pytest.mark.timeout(60)


def _clients(server: RedisServer) -> list[dict[str, str]]:
    """The connections Redis has open, minus the one ``command`` opens to ask."""
    reply = server.command("CLIENT", "LIST")
    assert isinstance(reply, bytes)
    entries = [
        dict(field.split("=", 1) for field in line.split(" ") if "=" in field)
        for line in reply.decode().splitlines()
        if line.strip()
    ]
    # command() opens one fresh connection per call, on the unix socket (flag U); the
    # connections under test use TCP.
    asking = [
        e
        for e in entries
        if "U" in e.get("flags", "") and e.get("cmd") in ("client|list", "client")
    ]
    assert len(asking) == 1, entries
    return [e for e in entries if e is not asking[0]]


def _shape(server: RedisServer) -> Counter[str]:
    """How many connections of each kind: ``normal`` and ``pubsub`` (one subscriber each)."""
    return Counter("pubsub" if int(e.get("sub", "0")) else "normal" for e in _clients(server))


async def _settle(server: RedisServer, expected: dict[str, int], within: float = 3) -> Counter[str]:
    """Wait for the connection counts to reach ``expected`` (connections open and close
    asynchronously); return the last counts seen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        shape = await asyncio.to_thread(_shape, server)
        if shape == Counter(expected) or loop.time() > deadline:
            return shape
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _sampling(server: RedisServer) -> AsyncIterator[list[int]]:
    """Sample the number of connections in the background while the block runs."""
    samples: list[int] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            samples.append(len(await asyncio.to_thread(_clients, server)))
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(sample())
    try:
        yield samples
    finally:
        done.set()
        await asyncio.wait_for(task, 10)


async def test_connection_counts_stay_constant(redis_server: RedisServer) -> None:
    assert _clients(redis_server) == []
    # A generous worker_timeout: this test counts connections, and on a busy machine the last
    # of 300 requests may wait a while for a free slot on the Node.
    app = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    async with serve_app(app) as base:
        # After the lifespan startup: one command connection and one subscriber.
        assert await _settle(redis_server, {"normal": 1, "pubsub": 1}) == {
            "normal": 1,
            "pubsub": 1,
        }
        async with run_node(node):
            # A Node adds three: popping, publishing and its subscriber.
            assert await _settle(redis_server, {"normal": 3, "pubsub": 2}) == {
                "normal": 3,
                "pubsub": 2,
            }
            limits = httpx.Limits(max_connections=300)
            async with httpx.AsyncClient(base_url=base, timeout=15, limits=limits) as client:
                assert (await client.get("/")).text == "Hello World!"
                assert len(_clients(redis_server)) == 5
                async with _sampling(redis_server) as samples:
                    responses = await asyncio.wait_for(
                        asyncio.gather(*(client.get(f"/{i}") for i in range(300))), 30
                    )
            assert [r.status_code for r in responses] == [200] * 300
            assert samples and max(samples) == 5 and min(samples) == 5, Counter(samples)
            assert await _settle(redis_server, {"normal": 3, "pubsub": 2}) == {
                "normal": 3,
                "pubsub": 2,
            }
        # The Node's three are gone once it stopped; the distributor's two remain.
        assert await _settle(redis_server, {"normal": 1, "pubsub": 1}) == {
            "normal": 1,
            "pubsub": 1,
        }
    # Everything stopped: only the connection asking is left.
    assert await _settle(redis_server, {}) == {}
    assert redis_keys(redis_server) == []


async def test_nothing_left_behind_after_a_mixed_workload(redis_server: RedisServer) -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("app error before the response")

    async def failing_late(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("app error mid-response")

    app = create_path_distributor(
        url=redis_server.url,
        routes={
            "^/ok": "ok",
            "^/up": "up",
            "^/slow": "slow",
            "^/sleepy": "sleepy",
            "^/err": "err",
            "^/late": "late",
        },
        max_body_size=1000,
    )
    # Requests no Node takes, through a second distributor that waits 0.5 s for an ack (the
    # first one keeps the default, so that a busy machine does not turn slow acks into 405s).
    lonely = create_distributor(url=redis_server.url, key="nobody", worker_timeout=0.5)
    nodes = [
        Node(url=redis_server.url, app=apps.hello, key="ok"),
        Node(url=redis_server.url, app=apps.count_upload, key="up"),
        Node(url=redis_server.url, app=apps.slow, key="slow"),
        Node(url=redis_server.url, app=apps.sleepy, key="sleepy"),
        Node(url=redis_server.url, app=failing, key="err", lifespan="off"),
        Node(url=redis_server.url, app=failing_late, key="late", lifespan="off"),
    ]

    async def chunked(n: int) -> Any:
        for _ in range(n):
            yield b"x" * 100

    async def one_round(client: httpx.AsyncClient, lonely_base: str) -> list[Any]:
        async def hang_up_mid_stream() -> str:
            async with client.stream("GET", "/slow?10") as response:
                async for _ in response.aiter_lines():
                    break
            return "hung up"

        async def give_up_before_answer() -> str:
            with pytest.raises(httpx.ReadTimeout):
                await client.get("/sleepy?1", timeout=httpx.Timeout(10, read=0.3))
            return "gave up"

        async def partial() -> str:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/late")
            return "aborted"

        async def status(method: str, path: str, **kwargs: Any) -> int:
            return (await client.request(method, path, **kwargs)).status_code

        return list(
            await asyncio.gather(
                status("GET", "/ok"),
                status("POST", "/up", content=b"x" * 500),
                status("POST", "/up", content=b"x" * 1001),  # 413 by content-length
                status("POST", "/up", content=chunked(30)),  # 413 while streaming
                status("GET", "/nowhere"),  # 404
                status("GET", lonely_base + "/nobody"),  # no worker: 405
                status("GET", "/err"),  # 500
                status("GET", "/sleepy?0"),
                partial(),
                hang_up_mid_stream(),
                give_up_before_answer(),
            )
        )

    expected = [200, 200, 413, 413, 404, 405, 500, 200, "aborted", "hung up", "gave up"]
    async with contextlib.AsyncExitStack() as stack:
        base = await stack.enter_async_context(serve_app(app))
        lonely_base = await stack.enter_async_context(serve_app(lonely))
        for node in nodes:
            await stack.enter_async_context(run_node(node))
        limits = httpx.Limits(max_connections=200)
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=base, timeout=15, limits=limits)
        )
        rounds = await asyncio.wait_for(
            asyncio.gather(*(one_round(client, lonely_base) for _ in range(10))), 30
        )
        assert rounds == [expected] * 10
        # Requests the clients gave up on end on the Nodes too.
        for _ in range(100):
            if not any(node.in_flight for node in nodes):
                break
            await asyncio.sleep(0.05)
        assert [node.in_flight for node in nodes] == [0] * len(nodes)
        assert redis_keys(redis_server) == []
        assert len(_clients(redis_server)) == 2 * 2 + 3 * len(nodes)
    assert redis_keys(redis_server) == []
    assert await _settle(redis_server, {}) == {}
