"""Load: 1,000 concurrent requests over two Nodes all complete, first come first served."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from minidasgi import Node, create_distributor

from .redis_server import RedisServer
from .stack import run_node, serve_app

pytestmark = pytest.mark.timeout(90)

WAVES = 10
PER_WAVE = 100


async def test_a_thousand_concurrent_requests_over_two_nodes_in_fifo_order(
    redis_server: RedisServer,
) -> None:
    """Requests arrive in ten waves faster than two Nodes serve them, so a queue builds up.
    All complete, and waves are served in the order they came: no wave is started before the
    one two places ahead of it has been, as it would be if the newest were served first."""
    started: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        started.append(int(scope["path"].split("/")[1]))  # the wave number
        await asyncio.sleep(0.02)
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"ok"})

    distributor = create_distributor(port=redis_server.port, key="load", worker_timeout=60)
    nodes = [
        Node(port=redis_server.port, app=app, key="load", concurrency=8, lifespan="off")
        for _ in range(2)
    ]
    limits = httpx.Limits(max_connections=WAVES * PER_WAVE, max_keepalive_connections=0)
    async with (
        serve_app(distributor, backlog=4096) as base,
        run_node(nodes[0]),
        run_node(nodes[1]),
        httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client,
    ):
        requests = []
        for wave in range(WAVES):
            requests += [asyncio.ensure_future(client.get(f"/{wave}/")) for _ in range(PER_WAVE)]
            await asyncio.sleep(0.02)
        responses = await asyncio.gather(*requests)
    assert [r.status_code for r in responses] == [200] * (WAVES * PER_WAVE)
    assert len(started) == WAVES * PER_WAVE
    first_start = {w: started.index(w) for w in range(WAVES)}
    last_start = {w: len(started) - 1 - started[::-1].index(w) for w in range(WAVES)}
    for wave in range(WAVES - 2):
        assert last_start[wave] < first_start[wave + 2], (wave, started)
    assert redis_server.command("KEYS", "*") == []
