"""Requests left in a list by a Redis restart or a failover never run after their client was
answered, nor twice (``minidasgi.confirmation``): a Node asks their distributor first.

Each scenario is real: a redis-server SIGKILLed after an fsync'd AOF and restarted from it, a
``SENTINEL FAILOVER`` with a backlog queued on the master (and copied to the replica). Runs are
counted by the app, per request id, with the moment each started, and compared with the
moment its client got its answer (one process, one monotonic clock: an order, not a timing).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import httpx
import pytest

from minidasgi import Node, create_distributor
from minidasgi.testing import RedisServer, SentinelSetup

from .redis_server import RedisFactory
from .stack import poll, run_node, serve_app

pytestmark = pytest.mark.timeout(60)

BACKLOG = 5


class RunLog:
    """An app that notes when each request (``x-request-id``) started to run."""

    def __init__(self, work: float = 0.0) -> None:
        self.work = work
        self.started: collections.defaultdict[str, list[float]] = collections.defaultdict(list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request_id = dict(scope["headers"]).get(b"x-request-id", b"-").decode()
        self.started[request_id].append(time.monotonic())
        await asyncio.sleep(self.work)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": request_id.encode()})

    def count(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.started.items()}


async def _get(client: httpx.AsyncClient, request_id: str) -> tuple[str, float]:
    """``(status or error, when answered)``."""
    try:
        response = await client.get("/", headers={"x-request-id": request_id})
        outcome = str(response.status_code)
    except httpx.HTTPError as exc:  # an aborted response
        outcome = type(exc).__name__
    return outcome, time.monotonic()


def _llen(server: RedisServer, key: str) -> int:
    try:
        length = server.command("LLEN", key)
    except ConnectionError:  # Sentinel's reconfiguration resets connections
        return -1
    assert isinstance(length, int)
    return length


@pytest.mark.parametrize("count_by", ["llen", "clock"])
async def test_requests_reloaded_by_a_restarted_redis_never_run(
    redis_factory: RedisFactory, count_by: str
) -> None:
    """Requests queued with no Node; Redis dies (its AOF fsync'd on every write), so each
    client gets its answer (502) while the request stays in the file; Redis restarts from it.
    A Node then pops them all: it must run none. ``clock``: the Node's ACL user may not run
    LLEN, so the recovery window is told by the envelopes' queued time."""
    server = redis_factory(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    runs = RunLog()
    # A deadline far away: only the confirmation can keep the Node from running them.
    distributor = create_distributor(url=server.url, key="K", worker_timeout=30)
    async with (
        serve_app(distributor) as base,
        httpx.AsyncClient(base_url=base, timeout=20) as client,
    ):
        sent = [asyncio.ensure_future(_get(client, f"stale-{i}")) for i in range(BACKLOG)]
        assert await poll(lambda: _llen(server, "K") == BACKLOG, 10)
        await asyncio.to_thread(server.kill)
        answers = await asyncio.wait_for(asyncio.gather(*sent), 20)
        assert {outcome for outcome, _ in answers} <= {"502", "503"}, answers
        await asyncio.to_thread(server.start)
        assert _llen(server, "K") == BACKLOG, "the premise: Redis reloaded the requests"
        url = server.url
        if count_by == "clock":
            server.command("ACL", "SETUSER", "node", "on", ">node-pw", "~*", "&*", "+@all", "-llen")
            url = f"redis://node:node-pw@{server.host}:{server.port}"
        # One at a time: the fresh request is popped only once every stale one was dealt with.
        node = Node(url=url, app=runs, key="K", lifespan="off", concurrency=1)
        assert await poll(lambda: distributor.ready, 10)
        async with run_node(node):
            fresh, _ = await _get(client, "fresh")
            assert node.recovery.popped(b"K") is (None if count_by == "clock" else False)
    assert fresh == "200"
    assert runs.count() == {"fresh": 1}, "requests answered 502 ran after their answer"
    assert _llen(server, "K") == 0


async def test_a_backlog_caught_by_a_failover_never_runs_after_its_answer_nor_twice(
    sentinels: SentinelSetup,
) -> None:
    """A Node of concurrency 1 and a slow app on the master, a backlog behind it, copied to
    the replica; ``SENTINEL FAILOVER``: every client gets an answer, no request runs twice, and
    none whose client got an error starts after that answer (the Node, back on the new master,
    finds the backlog there again)."""
    runs = RunLog(work=0.4)
    distributor = create_distributor(url=sentinels.url, key="fo-q", worker_timeout=30)
    node = Node(url=sentinels.url, app=runs, key="fo-q", lifespan="off", concurrency=1)
    old, replica = sentinels.servers
    async with (
        serve_app(distributor) as base,
        run_node(node),
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        ids = [f"queued-{i}" for i in range(8)]
        sent = {i: asyncio.ensure_future(_get(client, i)) for i in ids}

        def copied() -> bool:  # a backlog, on the replica too
            length = _llen(old, "fo-q")
            return length >= 4 and _llen(replica, "fo-q") == length

        assert await poll(copied, 10), "no backlog reached the replica"
        await asyncio.to_thread(sentinels.failover)
        promoted = await poll(lambda: asyncio.to_thread(lambda: sentinels.master() is replica), 15)
        assert promoted, "no promotion"
        answers = {i: await asyncio.wait_for(task, 30) for i, task in sent.items()}
        assert await poll(lambda: _llen(replica, "fo-q") == 0, 15), "the backlog stayed"
        assert await poll(lambda: node.in_flight == 0, 15)
        fresh, _ = await _get(client, "fresh")
    print({i: outcome for i, (outcome, _) in answers.items()}, runs.count())
    assert fresh == "200"
    twice = {i: n for i, n in runs.count().items() if n > 1}
    assert not twice, f"requests run more than once: {twice}"
    for request_id, (outcome, answered) in answers.items():
        assert outcome in ("200", "502", "503", "RemoteProtocolError"), answers
        if outcome != "200":
            late = [t for t in runs.started.get(request_id, []) if t > answered]
            assert not late, f"{request_id} ran after its client got {outcome}"
    assert any(outcome != "200" for outcome, _ in answers.values()), "the failover caught none"
