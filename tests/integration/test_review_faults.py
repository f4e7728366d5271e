"""Defects found reviewing issue 9's reliability work, each reproduced for real.

A response cut by the distributor while the Node's last body waits for credit (the CANCEL
must still stop the Node), forged SENDs landing before a request's ack (the violation must
still fail the request), a fail-fast distributor whose command link goes silent while idle
(its pipelined LPUSH must be bounded like any command), and forged PINGs naming thousands of
ids (a Node's answers must stay bounded). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from minidasgi import Node, create_distributor

from .redis_server import RedisServer
from .stack import poll, run_node, serve_app

pytestmark = pytest.mark.timeout(90)


async def _big_body(scope: Any, receive: Any, send: Any) -> None:
    """32 MiB in one ``http.response.body``: the Node splits it, under credit."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"x" * (32 << 20)})


async def test_a_cancel_stops_a_node_whose_last_body_waits_for_credit(
    redis_server: RedisServer,
) -> None:
    """The response timeout aborts a slow download: the distributor sends CANCEL (and no
    disconnect event). The app's last body is then sent but not yet published, so the
    response is not out: the Node must stop, not wait for credit that never comes."""
    distributor = create_distributor(
        url=redis_server.url, key="cancel-last", response_timeout=2
    )
    node = Node(url=redis_server.url, app=_big_body, key="cancel-last", lifespan="off")
    async with serve_app(distributor) as base, run_node(node):
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            received = 0
            deadline = time.monotonic() + 20
            # A slow reader: the distributor keeps relaying, so its response timeout fires.
            while time.monotonic() < deadline:
                try:
                    chunk = await asyncio.wait_for(reader.read(64 * 1024), 5)
                except (ConnectionError, asyncio.TimeoutError):
                    break
                if not chunk:
                    break
                received += len(chunk)
                await asyncio.sleep(0.05)
            assert 0 < received < 32 << 20, "the download was not cut by the response timeout"
        finally:
            writer.close()
        assert await poll(lambda: not distributor._exchanges, 5)
        assert await poll(lambda: node.in_flight == 0, 10), (
            "the Node still runs a request its distributor cancelled"
        )
