"""Limits a Redis server sets on its clients, reached for real: its idle-client ``timeout``
(``CONFIG SET timeout 1``, as managed services set it) closing a distributor's or a Node's
idle command connection. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import pytest

from .redis_server import RedisServer, client_list
from .stack import NodeProcess, distributor_process, poll

pytestmark = pytest.mark.timeout(60)


def _commands(server: RedisServer) -> list[str]:
    """The last command of each connection to ``server`` (``CLIENT LIST``'s ``cmd``)."""
    return [c["cmd"] for c in client_list(server)]


async def test_a_request_as_redis_closes_idle_connections_is_served(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both the distributor and the Node are stopped (SIGSTOP) while Redis closes their idle
    command connections, and a request is sent meanwhile: once resumed, each finds its
    connection closed with the request in hand. The distributor waits for the new connection
    it opens at once (it answered 503 while Redis was up) and the Node acks once its
    publisher is back; the request runs once. So does one sent after an idle period."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("MINIDASGI_TEST_LOG", str(runs))
    redis_server.command("CONFIG", "SET", "timeout", "1")
    # A long pop timeout: the Node's pop stays blocked (Redis closes no blocked client), so
    # the request reaches the stopped Node.
    with NodeProcess(redis_server.url, "idle", "apps:logged_sleepy", "--pop-timeout", "30") as node:
        assert node.process is not None
        async with distributor_process(redis_server.url, "idle") as (base, front):
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                warm = await client.get("/?0", headers={"x-request-id": "warm"})
                assert warm.status_code == 200
                stopped = [node.process.pid, front.pid]
                for pid in stopped:
                    os.kill(pid, signal.SIGSTOP)
                try:
                    # The distributor's LPUSH connection and the Node's PUBLISH one closed.
                    assert await poll(
                        lambda: not {"lpush", "publish"} & set(_commands(redis_server)), 10
                    ), _commands(redis_server)
                    request = asyncio.ensure_future(
                        client.get("/?0", headers={"x-request-id": "one"})
                    )
                    await asyncio.sleep(0.2)  # the request waits in the stopped distributor
                finally:
                    for pid in stopped:
                        os.kill(pid, signal.SIGCONT)
                response = await request
                assert (response.status_code, response.text) == (200, "slept one")
                # After an idle period long enough for Redis to close the connections again.
                await asyncio.sleep(2.5)
                later = await client.get("/?0", headers={"x-request-id": "two"})
                assert (later.status_code, later.text) == (200, "slept two")
    assert runs.read_text().split() == [
        "start", "warm", "end", "warm", "start", "one", "end", "one", "start", "two", "end", "two"
    ]  # fmt: skip
