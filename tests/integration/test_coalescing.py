"""Coalescing across requests and the cost of a request, asserted structurally: Redis commands
counted by ``INFO commandstats``, cyclic garbage counted by the collector. No timings."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections import Counter
from typing import Any

import httpx
import pytest

from minidasgi import Node, create_distributor
from minidasgi.testing import RedisServer

from . import apps
from .stack import run_node, serve_app

N = 100


def _calls(redis_server: RedisServer) -> Counter[str]:
    info = redis_server.command("INFO", "commandstats")
    assert isinstance(info, bytes)
    calls: Counter[str] = Counter()
    for line in info.decode().splitlines():
        if line.startswith("cmdstat_"):
            name, stats = line[len("cmdstat_") :].split(":", 1)
            calls[name] = int(stats.split("calls=")[1].split(",")[0])
    return calls


async def test_100_concurrent_requests_cost_fewer_than_100_publish_and_100_lpush(
    redis_server: RedisServer,
) -> None:
    # No liveness pings: only the requests' own messages are counted.
    distributor = create_distributor(url=redis_server.url, key="K", liveness_interval=3600)
    node = Node(url=redis_server.url, app=apps.hello, key="K", lifespan="off")
    limits = httpx.Limits(max_connections=N, max_keepalive_connections=N)
    async with (
        serve_app(distributor, backlog=2 * N) as base,
        run_node(node),
        httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client,
    ):
        # Open the connections first, so that the counted round starts together.
        await asyncio.gather(*(client.get("/") for _ in range(N)))
        await asyncio.to_thread(redis_server.command, "CONFIG", "RESETSTAT")
        responses = await asyncio.gather(*(client.get("/") for _ in range(N)))
        calls = await asyncio.to_thread(_calls, redis_server)
    assert [r.text for r in responses] == ["Hello World!"] * N
    # One LPUSH per request and one or two PUBLISH (ack, response) before coalescing.
    assert calls["lpush"] < N, calls
    assert calls["publish"] < N, calls
    batches = node.outbox.batcher
    assert batches.items > batches.batches  # the Node's batches carried several messages


def _garbage_of_ours() -> Counter[str]:
    """What the collector found unreachable in cycles, of minidasgi's own types and of the
    asyncio objects a request used to own (a Queue, a Task per request)."""
    return Counter(
        type(o).__qualname__
        for o in gc.garbage
        if type(o).__module__.startswith("minidasgi") or isinstance(o, asyncio.Queue)
    )


async def test_requests_leave_no_cyclic_garbage(redis_server: RedisServer) -> None:
    distributor = create_distributor(url=redis_server.url, key="K", liveness_interval=3600)
    node = Node(url=redis_server.url, app=apps.hello, key="K", lifespan="off")
    async with (
        serve_app(distributor) as base,
        run_node(node),
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        for _ in range(10):  # warm up: connections, caches
            await client.get("/")
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)  # keep what is found, to see what it was
        try:
            for _ in range(N):
                assert (await client.get("/")).status_code == 200
            gc.collect()
            found = _garbage_of_ours()
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    # Every request freed by reference counting: the exchange, the job, their windows.
    assert sum(found.values()) < N // 10, found


async def test_one_request_at_a_time_costs_one_pop_and_no_task_per_pop(
    redis_server: RedisServer,
) -> None:
    """A Node pops with one BLMPOP per request, not a BRPOP and then an empty RPOP, and its pop
    loop creates no task beyond the request's own (no ``wait_for``, no wait on the stop)."""
    distributor = create_distributor(url=redis_server.url, key="K", liveness_interval=3600)
    node = Node(url=redis_server.url, app=apps.hello, key="K", lifespan="off")
    async with (
        serve_app(distributor) as base,
        run_node(node),
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        await client.get("/")  # warm up: connections, the pop connection's CLIENT ID
        await asyncio.to_thread(redis_server.command, "CONFIG", "RESETSTAT")
        loop = asyncio.get_running_loop()
        factory = loop.get_task_factory()
        created: Counter[str] = Counter()

        def counting(loop: asyncio.AbstractEventLoop, coro: Any) -> asyncio.Future[Any]:
            created[getattr(coro, "__qualname__", "?")] += 1
            if factory is not None:
                return factory(loop, coro)
            return asyncio.Task(coro, loop=loop)

        loop.set_task_factory(counting)  # type: ignore[arg-type]
        try:
            for _ in range(20):
                assert (await client.get("/")).text == "Hello World!"
        finally:
            loop.set_task_factory(factory)
        calls = await asyncio.to_thread(_calls, redis_server)
    pops = calls["blmpop"] + calls["brpop"] + calls["rpop"]
    assert calls["brpop"] == calls["rpop"] == 0, calls
    assert 20 <= pops <= 21, calls  # one per request (and the pop waiting for the next)
    # Besides the server's task per request (and a distributor's pump, past 50 ms), only the
    # Node's own task per request: the pop loop adds none.
    others = ("RequestResponseCycle.", "_Exchange.")
    node_tasks = {name: n for name, n in created.items() if not name.startswith(others)}
    assert node_tasks == {"Node._run_request": 20}, created


async def test_a_request_never_asks_asyncio_for_the_running_loop(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``asyncio.get_running_loop()`` costs a ``getpid()`` system call on Python 3.11: the
    distributor's path of a request uses the loop it keeps, and asks asyncio for none."""
    distributor = create_distributor(url=redis_server.url, key="K", liveness_interval=3600)
    node = Node(url=redis_server.url, app=apps.hello, key="K", lifespan="off")
    asked: Counter[str] = Counter()
    real = asyncio.get_running_loop

    def counting() -> asyncio.AbstractEventLoop:
        caller = sys._getframe(1).f_code
        if caller.co_filename.endswith(os.path.join("minidasgi", "distributor.py")):
            asked[caller.co_name] += 1
        return real()

    async with (
        serve_app(distributor) as base,
        run_node(node),
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        await client.get("/")  # warm up: the distributor binds its loop and connects
        monkeypatch.setattr(asyncio, "get_running_loop", counting)
        for _ in range(20):
            assert (await client.get("/")).text == "Hello World!"
        monkeypatch.undo()
    assert asked == {}, asked


async def test_a_download_costs_fewer_than_three_publish_per_mib(
    redis_server: RedisServer,
) -> None:
    # Pieces of wire.PIECE_SIZE (512 KiB) once both sides know them: two data PUBLISH per MiB,
    # and a credit every half window (a quarter of a PUBLISH per MiB). With 128 KiB pieces it
    # took about 4.7 PUBLISH per MiB (three pieces per batch frame, a credit every 512 KiB).
    size = 16 * (1 << 20)
    distributor = create_distributor(url=redis_server.url, key="S", liveness_interval=3600)
    node = Node(url=redis_server.url, app=apps.download, key="S", lifespan="off")
    async with (
        serve_app(distributor) as base,
        run_node(node),
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        await asyncio.to_thread(redis_server.command, "CONFIG", "RESETSTAT")
        received = 0
        async with client.stream("GET", f"/?{size}") as response:
            async for data in response.aiter_raw():
                received += len(data)
        calls = await asyncio.to_thread(_calls, redis_server)
    assert received == size
    assert calls["publish"] < 3 * 16, calls
