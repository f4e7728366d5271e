"""Operations: presence and fail-fast, admission bounds, `minidasgi status`, metrics, health
probes and the access log, with real Redis servers, Nodes and uvicorn.

Faults are real: Nodes SIGKILLed in child processes, Redis stopped, ACL users limited to the
commands the README lists. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from minidasgi import Distributor, Node, wire
from minidasgi.resp import connect
from minidasgi.resp.connection import parse_url
from minidasgi.resp.protocol import ReplyError
from minidasgi.status import take_status

from . import apps
from .faultproxy import FaultProxy
from .redis_server import RedisServer, client_list
from .stack import NodeProcess, poll, redis_keys, run_node, serve_app, ws_url

pytestmark = pytest.mark.timeout(60)

WORKER_TIMEOUT = 20.0  # long, so that an answer "at once" is told apart from one after it
AT_ONCE = WORKER_TIMEOUT / 4


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, parsed by the reference parser."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


@contextlib.asynccontextmanager
async def _stack(redis: RedisServer, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    options.setdefault("worker_timeout", WORKER_TIMEOUT)
    distributor = Distributor(key="ops", url=redis.url, **options)
    async with serve_app(distributor) as base:
        async with httpx.AsyncClient(base_url=base, timeout=WORKER_TIMEOUT * 2) as client:
            client.distributor = distributor  # type: ignore[attr-defined]
            yield client


# 1. Presence and fail-fast


async def test_fail_fast_answers_at_once_when_no_node_listens(redis_server: RedisServer) -> None:
    async with _stack(redis_server, fail_fast=True) as client:
        started = time.monotonic()
        response = await client.get("/nobody")
        assert time.monotonic() - started < AT_ONCE
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert redis_keys(redis_server) == []  # the request was taken back
        metrics = client.distributor.metrics  # type: ignore[attr-defined]
        assert metrics.refusals.get(("no_node",)) == 1
        assert metrics.refusals.get(("no_ack",)) == 0


async def test_fail_fast_serves_while_a_node_listens_and_refuses_once_it_is_killed(
    redis_server: RedisServer,
) -> None:
    async with _stack(redis_server, fail_fast=True) as client:
        node = await asyncio.to_thread(NodeProcess(redis_server.url, "ops").start)
        try:
            response = await client.get("/hello")
            assert response.status_code == 200
            await asyncio.to_thread(node.kill)  # SIGKILL: no goodbye, Redis drops its sockets
            assert await poll(lambda: _listeners(redis_server, "ops") == 0, 10)
            started = time.monotonic()
            response = await client.get("/hello")
            assert response.status_code == 503
            assert time.monotonic() - started < AT_ONCE
            assert redis_keys(redis_server) == []
        finally:
            await asyncio.to_thread(node.stop)


async def test_a_stopping_node_withdraws_its_presence_before_its_drain(
    redis_server: RedisServer,
) -> None:
    release = asyncio.Event()

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        # Answers once released (nothing sent before): in flight for as long as the test
        # needs, not for a fixed sleep (6 s before).
        if scope["type"] == "http":
            await asyncio.wait_for(release.wait(), 20)
            await apps.hello(scope, receive, send)

    node = Node(url=redis_server.url, key="ops", app=slow_app, shutdown_timeout=10)
    async with _stack(redis_server, fail_fast=True) as client, run_node(node):
        assert _listeners(redis_server, "ops") == 1
        slow = asyncio.ensure_future(client.get("/slow"))
        assert await poll(lambda: node.in_flight == 1, 10)
        node.stop()  # drains the request in flight; new ones must go elsewhere at once
        assert await poll(lambda: _listeners(redis_server, "ops") == 0, 3)
        response = await client.get("/")
        assert response.status_code == 503
        assert not slow.done()  # still draining: the presence went first
        release.set()
        assert (await slow).status_code == 200


async def test_without_fail_fast_the_seed_behaviour_stays(redis_server: RedisServer) -> None:
    async with _stack(redis_server, worker_timeout=0.5) as client:
        response = await client.get("/nobody")
        assert response.status_code == 405
        assert "retry-after" not in response.headers
        metrics = client.distributor.metrics  # type: ignore[attr-defined]
        assert metrics.refusals.get(("no_ack",)) == 1
        assert metrics.refusals.get(("no_node",)) == 0


def _listeners(redis: RedisServer, key: str) -> int:
    reply = redis.command("PUBSUB", "NUMSUB", f"minidasgi:0:presence:{key}")
    assert isinstance(reply, list)
    return int(reply[1])


# 2. Admission


async def test_max_queue_refuses_at_once_and_leaves_the_queue_at_its_bound(
    redis_server: RedisServer,
) -> None:
    async with _stack(redis_server, max_queue=2) as client:
        waiting = [asyncio.ensure_future(client.get("/?0")) for _ in range(2)]
        assert await poll(lambda: redis_server.command("LLEN", "ops") == 2, 10)
        started = time.monotonic()
        response = await client.get("/third")
        assert time.monotonic() - started < AT_ONCE
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "full" in response.text
        assert redis_server.command("LLEN", "ops") == 2
        metrics = client.distributor.metrics  # type: ignore[attr-defined]
        assert metrics.refusals.get(("queue_full",)) == 1
        # The two that fit are served once a Node comes.
        async with run_node(Node(url=redis_server.url, key="ops", app=apps.sleepy)):
            assert [r.status_code for r in await asyncio.gather(*waiting)] == [200, 200]
        assert redis_keys(redis_server) == []


async def test_max_queue_per_key(redis_server: RedisServer) -> None:
    async with _stack(redis_server, max_queue={"other": 5, "ops": 1}) as client:
        first = asyncio.ensure_future(client.get("/?0"))
        assert await poll(lambda: redis_server.command("LLEN", "ops") == 1, 10)
        assert (await client.get("/")).status_code == 503
        async with run_node(Node(url=redis_server.url, key="ops", app=apps.sleepy)):
            assert (await first).status_code == 200


async def test_max_in_flight_refuses_before_touching_redis(redis_server: RedisServer) -> None:
    node = Node(url=redis_server.url, key="ops", app=apps.sleepy)
    async with _stack(redis_server, max_in_flight=1) as client, run_node(node):
        slow = asyncio.ensure_future(client.get("/?1"))
        assert await poll(lambda: node.in_flight == 1, 10)
        redis_server.command("CONFIG", "RESETSTAT")
        response = await client.get("/?0")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        stats = redis_server.command("INFO", "commandstats")
        assert isinstance(stats, bytes)
        assert b"cmdstat_lpush" not in stats
        assert (await slow).status_code == 200
        metrics = client.distributor.metrics  # type: ignore[attr-defined]
        assert metrics.refusals.get(("max_in_flight",)) == 1


def test_bounds_must_be_positive_integers() -> None:
    for bad in ({"max_queue": 0}, {"max_in_flight": -1}, {"max_queue": {"k": 1.5}}):
        with pytest.raises(ValueError, match="bounds"):
            Distributor(key="k", **bad)  # type: ignore[arg-type]


# 3. Status


async def test_status_shows_waiting_requests_nodes_and_distributors(
    redis_server: RedisServer,
) -> None:
    busy = Node(url=redis_server.url, key="ops", app=apps.sleepy, concurrency=1)
    idle = Node(url=redis_server.url, keys=["ops", "spare"], app=apps.sleepy, concurrency=3)
    params = parse_url(redis_server.url)
    async with _stack(redis_server) as client, run_node(busy):
        slow = [asyncio.ensure_future(client.get("/?1.5")) for _ in range(3)]
        # One runs, two wait: nobody else pops "ops" yet.
        assert await poll(lambda: redis_server.command("LLEN", "ops") == 2, 10)
        await asyncio.sleep(0.2)
        before = redis_keys(redis_server)
        report = await take_status(params, ["ops"], timeout=5)
        assert redis_keys(redis_server) == before  # status stores nothing
        (queue,) = report["queues"]
        assert queue["key"] == "ops" and queue["waiting"] == 2 and queue["nodes"] == 1
        assert queue["oldest_age"] >= 0.2
        (node,) = report["nodes"]
        assert node["keys"] == ["ops"] and node["concurrency"] == 1 and node["in_flight"] == 1
        (dist,) = report["distributors"]
        assert dist["in_flight"] == 3
        assert report["asked"] == report["answered"] == 2
        async with run_node(idle):
            await asyncio.gather(*slow)
            report = await take_status(params, timeout=5)
            assert [q["key"] for q in report["queues"]] == ["ops", "spare"]
            assert [q["nodes"] for q in report["queues"]] == [2, 1]
            assert sum(n["served"] for n in report["nodes"]) == 3
            assert report["distributors"][0]["served"] == 3
    assert redis_keys(redis_server) == []


async def test_status_is_bounded_when_a_node_cannot_answer(redis_server: RedisServer) -> None:
    """A Node whose link stalls (no FIN, no RST) still counts as a receiver of the stats
    request: status waits for it only up to its timeout, then shows who answered."""
    params = parse_url(redis_server.url)
    with FaultProxy(redis_server.port) as proxy:
        stalled = Node(url=proxy.url(), key="ops", app=apps.hello)
        healthy = Node(url=redis_server.url, key="ops", app=apps.hello)
        async with run_node(stalled), run_node(healthy):
            proxy.stall(up=True, down=True)
            started = time.monotonic()
            report = await take_status(params, timeout=1.0)
            assert time.monotonic() - started < 10  # bounded by the timeout, not by the Node
            assert (report["asked"], report["answered"]) == (2, 1)
            assert [n["channel"] for n in report["nodes"]] == [healthy.channel]
            assert report["queues"] == [
                {"key": "ops", "waiting": 0, "oldest_age": None, "nodes": 2}
            ]
            proxy.resume()


async def test_forged_stats_requests_are_not_answered_and_hurt_nothing(
    redis_server: RedisServer,
) -> None:
    """Stats requests come from anyone with the credentials: a malformed one is dropped, and
    none makes a process publish anywhere but on a status channel of its own namespace."""
    node = Node(url=redis_server.url, key="ops", app=apps.hello)
    async with _stack(redis_server) as client, run_node(node):
        stats_channel = wire.stats_channel("minidasgi", 0)
        victim = client.distributor.channel  # type: ignore[attr-defined]
        redis_server.command("CONFIG", "RESETSTAT")
        forged = (
            b"garbage",
            wire.pack(wire.STATS, "id"),
            wire.pack(wire.STATS, "id", victim),  # a peer's channel: refused
            wire.pack(wire.STATS, "id", "minidasgi:1:status:x"),  # another db: refused
            wire.pack(wire.STATS, "id", ["minidasgi:0:status:x"]),
        )
        for message in forged:
            assert redis_server.command("PUBLISH", stats_channel, message) == 2
        await asyncio.sleep(0.3)
        stats = redis_server.command("INFO", "commandstats")
        assert isinstance(stats, bytes)
        assert b"cmdstat_publish:calls=%d," % len(forged) in stats  # ours, and no answer
        assert (await client.get("/")).status_code == 200  # both still serve


async def test_status_command_json_and_text(redis_server: RedisServer) -> None:
    async with run_node(Node(url=redis_server.url, key="ops", app=apps.hello)):
        args = ["-m", "minidasgi", "status", "--redis", redis_server.url, "--timeout", "5"]
        text = await _run(*args)
        assert "ops" in text and "NODE" in text
        report = json.loads(await _run(*args, "--json", "ops"))
        assert report["queues"][0] == {"key": "ops", "waiting": 0, "oldest_age": None, "nodes": 1}


async def test_status_command_fails_clearly_without_redis() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "minidasgi",
        "status",
        "--redis",
        "redis://:s3cret@127.0.0.1:1",
        "--timeout",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert b"cannot ask Redis" in err and b"s3cret" not in err + out


async def _run(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_readme_acl_commands_are_enough(redis_server: RedisServer) -> None:
    """The ACL lists in the README, for each side and for `status`, and nothing more."""
    redis = redis_server
    common = ["on", ">pw", "~ops", "&minidasgi:*", "+ping"]
    redis.command("ACL", "SETUSER", "dist", *common, "+lpush", "+lrem", "+publish", "+subscribe",
                  "+pubsub|numsub")  # fmt: skip
    redis.command("ACL", "SETUSER", "node", *common, "+blmpop", "+brpop", "+rpop", "+llen",
                  "+publish", "+subscribe", "+client|id", "+client|unblock")  # fmt: skip
    redis.command("ACL", "SETUSER", "ops", *common, "+llen", "+lindex", "+publish",
                  "+subscribe", "+pubsub|numsub")  # fmt: skip
    url = f"redis://{{}}:pw@127.0.0.1:{redis.port}/0"
    node = Node(url=url.format("node"), key="ops", app=apps.hello)
    distributor = Distributor(key="ops", url=url.format("dist"), fail_fast=True)
    async with serve_app(distributor) as base, httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/")).status_code == 503  # fail-fast: nobody listens
        async with run_node(node):
            assert (await client.get("/")).status_code == 200
            assert node.recovery.popped(b"ops") is False  # LLEN allowed: the window counted
            report = await take_status(parse_url(url.format("ops")), timeout=5)
            assert report["queues"][0]["nodes"] == 1
            assert report["answered"] == 2
    assert not distributor.admission._numsub_refused


async def test_a_node_whose_acl_user_lacks_blmpop_pops_with_brpop_and_rpop(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL recipe written before BLMPOP (or Redis before 7.0): the Node still serves,
    popping in two round trips."""
    redis = redis_server
    redis.command("ACL", "SETUSER", "older", "on", ">pw", "~ops", "&minidasgi:*", "+ping",
                  "+brpop", "+rpop", "+publish", "+subscribe")  # fmt: skip
    caplog.set_level(logging.INFO, "minidasgi.node")
    url = f"redis://older:pw@127.0.0.1:{redis.port}/0"
    # No CLIENT UNBLOCK in this recipe: a stop waits for the pop to time out.
    node = Node(url=url, key="ops", app=apps.hello, pop_timeout=0.5)
    distributor = Distributor(key="ops", url=redis.url)
    async with (
        serve_app(distributor) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
        run_node(node),
    ):
        answers = await asyncio.gather(*(client.get("/") for _ in range(5)))
    assert [a.text for a in answers] == ["Hello World!"] * 5
    assert "popping with BRPOP and RPOP (no BLMPOP: NOPERM" in caplog.text
    info = redis.command("INFO", "commandstats")
    assert isinstance(info, bytes) and b"cmdstat_brpop:calls=" in info


async def test_a_refused_blmpop_is_not_kept_alive_through_the_brpop_after_it(
    redis_server: RedisServer,
) -> None:
    """The pop that falls back to BRPOP waits outside the handler of BLMPOP's refusal: the
    error, its traceback and their frames are not held for the whole wait."""
    redis = redis_server
    redis.command("ACL", "SETUSER", "older", "on", ">pw", "~ops", "&minidasgi:*", "+ping",
                  "+brpop", "+rpop", "+publish", "+subscribe", "+client|id",
                  "+client|unblock")  # fmt: skip
    url = f"redis://older:pw@127.0.0.1:{redis.port}/0"
    node = Node(url=url, key="ops", app=apps.hello, pop_timeout=30)

    def brpop_waits() -> bool:
        clients = redis.command("CLIENT", "LIST")
        assert isinstance(clients, bytes)
        return b"cmd=brpop" in clients

    def refusals() -> list[ReplyError]:
        gc.collect()  # what only a cycle holds goes
        return [o for o in gc.get_objects() if isinstance(o, ReplyError) and "blmpop" in str(o)]

    earlier = refusals()  # of tests before this one (held here: no id of theirs reused)
    async with run_node(node):
        assert await poll(brpop_waits, 10), "the Node never waited in a BRPOP"
        assert not node._pop_many  # BLMPOP was refused, and the BRPOP is the first pop's
        refused = [o for o in refusals() if not any(o is e for e in earlier)]
        assert not refused, refused


# 4. Metrics, health, access log


async def test_distributor_metrics_parse_and_count(redis_server: RedisServer) -> None:
    node = Node(url=redis_server.url, key="ops", app=apps.hello)
    async with _stack(redis_server, ops_prefix="/-/", fail_fast=True) as client:
        assert (await client.get("/")).status_code == 503  # no Node yet
        async with run_node(node):
            for _ in range(3):
                assert (await client.get("/")).status_code == 200
        scrape = await client.get("/-/metrics")
        assert scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = _samples(scrape.text)
        ok = (
            "minidasgi_distributor_requests_total",
            frozenset({("key", "ops"), ("status", "200")}),
        )
        assert samples[ok] == 3
        refused = ("minidasgi_distributor_refusals_total", frozenset({("reason", "no_node")}))
        assert samples[refused] == 1
        count = ("minidasgi_distributor_queue_wait_seconds_count", frozenset({("key", "ops")}))
        assert samples[count] == 3
        inf = frozenset({("key", "ops"), ("le", "+Inf")})
        assert samples[("minidasgi_distributor_request_seconds_bucket", inf)] == 4
        assert samples[("minidasgi_redis_connected", frozenset())] == 1
        assert samples[("minidasgi_distributor_in_flight", frozenset())] == 0
        # The ops paths are never routed.
        assert (await client.get("/-/nothing")).status_code == 404
        assert redis_keys(redis_server) == []


async def test_distributor_probes_follow_redis(redis_server: RedisServer) -> None:
    async with _stack(redis_server, ops_prefix="/-/") as client:
        assert (await client.get("/-/readyz")).status_code == 200
        redis_server.stop()  # a real outage
        try:
            assert await poll(_status_is(client, "/-/readyz", 503), 10)
            assert (await client.get("/-/healthz")).status_code == 200  # no restart for this
        finally:
            redis_server.start()
        assert await poll(_status_is(client, "/-/readyz", 200), 15)


async def test_node_health_port(redis_server: RedisServer) -> None:
    node = Node(url=redis_server.url, key="ops", app=apps.hello, health_port=0)
    async with _stack(redis_server) as client, run_node(node):
        assert (await client.get("/")).status_code == 200
        assert node.health_server is not None
        base = f"http://127.0.0.1:{node.health_server.port}"
        async with httpx.AsyncClient(base_url=base) as probe:
            assert (await probe.get("/-/readyz")).status_code == 200
            samples = _samples((await probe.get("/-/metrics")).text)
            served = (
                "minidasgi_node_requests_total",
                frozenset({("key", "ops"), ("status", "200")}),
            )
            assert samples[served] == 1
            assert samples[("minidasgi_node_concurrency", frozenset())] == 100
            assert (await probe.post("/-/metrics")).status_code == 405
            redis_server.stop()
            try:
                assert await poll(_status_is(probe, "/-/readyz", 503), 15)
                assert (await probe.get("/-/healthz")).status_code == 200
            finally:
                redis_server.start()
            assert await poll(_status_is(probe, "/-/readyz", 200), 15)


async def test_node_health_port_bounds_the_request_head(redis_server: RedisServer) -> None:
    node = Node(url=redis_server.url, key="ops", app=apps.hello, health_port=0)
    async with run_node(node):
        assert node.health_server is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", node.health_server.port)
        writer.write(b"GET /-/healthz HTTP/1.1\r\nX: " + b"a" * 20000)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing answered
        writer.close()


def _status_is(client: httpx.AsyncClient, path: str, status: int) -> Any:
    async def check() -> bool:
        return (await client.get(path)).status_code == status

    return check


async def test_access_log_json(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    node = Node(url=redis_server.url, key="ops", app=apps.hello)
    caplog.set_level(logging.INFO, logger="minidasgi.access")
    async with _stack(redis_server, access_log="json") as client, run_node(node):
        assert (await client.get("/some/path", params={"secret": "x"})).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "minidasgi.access"]
    (line,) = lines
    entry = json.loads(line)
    assert entry["method"] == "GET" and entry["path"] == "/some/path" and entry["key"] == "ops"
    assert entry["status"] == 200 and entry["node"].startswith("minidasgi:0:node:")
    assert 0 <= entry["queue_wait_ms"] <= entry["total_ms"]
    assert "secret" not in line


async def test_an_aborted_response_is_counted_and_logged_as_aborted(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A Node SIGKILLed once its streamed response started: the distributor aborts the
    client's connection mid-body. The access log keeps the status the client saw (200) and
    says the response was aborted; ``minidasgi_distributor_aborted_total`` counts it, and a
    complete response beside it is counted and logged as complete."""
    caplog.set_level(logging.INFO, logger="minidasgi.access")
    node = await asyncio.to_thread(NodeProcess(redis_server.url, "ops", "apps:slow").start)
    try:
        async with _stack(redis_server, access_log="json", ops_prefix="/-/") as client:
            assert (await client.get("/whole?2")).status_code == 200
            with pytest.raises(httpx.HTTPError):
                async with client.stream("GET", "/cut?100") as response:
                    assert response.status_code == 200
                    async for _ in response.aiter_bytes():
                        await asyncio.to_thread(node.kill)  # mid-body: no goodbye
            scrape = (await client.get("/-/metrics")).text
    finally:
        await asyncio.to_thread(node.stop)
    samples = _samples(scrape)
    assert samples[("minidasgi_distributor_aborted_total", frozenset({("key", "ops")}))] == 1
    ok = ("minidasgi_distributor_requests_total", frozenset({("key", "ops"), ("status", "200")}))
    assert samples[ok] == 2  # the status the client saw, for both
    lines = [r.getMessage() for r in caplog.records if r.name == "minidasgi.access"]
    entries = {entry["path"]: entry for entry in map(json.loads, lines)}
    assert entries["/whole"]["status"] == 200 and entries["/whole"]["aborted"] is False
    assert entries["/cut"]["status"] == 200 and entries["/cut"]["aborted"] is True


async def test_a_websocket_its_node_cut_is_counted_and_logged_as_aborted(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A Node SIGKILLed while a WebSocket it accepted is open: the distributor closes the
    socket with 1011. The access log keeps the status the client saw (101) and says the
    session was aborted; ``minidasgi_distributor_aborted_total`` counts it. A session the
    client closes is logged as complete."""
    caplog.set_level(logging.INFO, logger="minidasgi.access")

    def logged() -> dict[str, Any]:
        lines = [r.getMessage() for r in caplog.records if r.name == "minidasgi.access"]
        return {entry["path"]: entry for entry in map(json.loads, lines)}

    node = await asyncio.to_thread(NodeProcess(redis_server.url, "ops", "apps:ws_echo").start)
    try:
        async with _stack(redis_server, access_log="json", ops_prefix="/-/") as client:
            base = ws_url(str(client.base_url).rstrip("/"))
            async with websockets.connect(base + "/whole") as ws:
                await ws.send("one")
                assert await asyncio.wait_for(ws.recv(), 10) == "one"
            assert await poll(lambda: "/whole" in logged(), 10)
            async with websockets.connect(base + "/cut") as ws:
                await ws.send("one")
                assert await asyncio.wait_for(ws.recv(), 10) == "one"
                await asyncio.to_thread(node.kill)  # no goodbye
                with pytest.raises(websockets.ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1011
            assert await poll(lambda: "/cut" in logged(), 10)
            scrape = (await client.get("/-/metrics")).text
    finally:
        await asyncio.to_thread(node.stop)
    samples = _samples(scrape)
    assert samples[("minidasgi_distributor_aborted_total", frozenset({("key", "ops")}))] == 1
    entries = logged()
    assert entries["/whole"]["status"] == 101 and entries["/whole"]["aborted"] is False
    assert entries["/cut"]["status"] == 101 and entries["/cut"]["aborted"] is True


async def test_a_malformed_first_event_is_not_counted_as_an_aborted_response(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A forged Node whose first event is not an event at all: nothing was started, so the
    server answers its own 500. That is not a response aborted after it started: neither
    ``minidasgi_distributor_aborted_total`` nor the access log says so. Both give the status
    the client got, 500 (0 before: no response was started)."""
    caplog.set_level(logging.INFO, logger="minidasgi.access")
    connection = await asyncio.wait_for(connect(redis_server.url), 5)
    try:
        async with _stack(redis_server, access_log="json", ops_prefix="/-/") as client:
            request = asyncio.ensure_future(client.get("/forged"))
            popped = await connection.brpop("ops", timeout=10)
            assert popped is not None
            envelope = wire.Envelope.decode(popped[1])
            node = wire.new_channel("minidasgi", 0, "node")
            frame = wire.batch_frame(
                [
                    wire.pack(wire.ACK, envelope.id, node, 1, 1.0),
                    wire.pack(wire.SEND, envelope.id, ["not an event"]),
                ]
            )
            await connection.publish(envelope.reply, frame)
            assert (await asyncio.wait_for(request, 10)).status_code == 500
            scrape = (await client.get("/-/metrics")).text
    finally:
        await connection.close()
    samples = _samples(scrape)
    assert samples.get(("minidasgi_distributor_aborted_total", frozenset({("key", "ops")})), 0) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "minidasgi.access"]
    entries = {entry["path"]: entry for entry in map(json.loads, lines)}
    assert entries["/forged"]["aborted"] is False
    assert entries["/forged"]["status"] == 500
    counted = (
        "minidasgi_distributor_requests_total",
        frozenset({("key", "ops"), ("status", "500")}),
    )
    assert samples[counted] == 1
    unanswered = (
        "minidasgi_distributor_requests_total",
        frozenset({("key", "ops"), ("status", "0")}),
    )
    assert unanswered not in samples


async def _raises_before_accept(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await receive()
        raise RuntimeError("no database")


async def test_a_websocket_app_raising_before_accept_is_counted_and_logged_as_500(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The handshake is left unanswered (no response started, status 0): the server answers
    500, and so say the access log and ``minidasgi_distributor_requests_total``."""
    caplog.set_level(logging.INFO, logger="minidasgi.access")
    node = Node(url=redis_server.url, key="ops", app=_raises_before_accept, lifespan="off")
    async with (
        _stack(redis_server, access_log="json", ops_prefix="/-/") as client,
        run_node(node),
    ):
        base = ws_url(str(client.base_url).rstrip("/"))
        with pytest.raises(websockets.InvalidStatus) as info:
            await asyncio.wait_for(websockets.connect(base + "/fails"), 10)
        assert info.value.response.status_code == 500

        def logged() -> dict[str, Any]:
            lines = [r.getMessage() for r in caplog.records if r.name == "minidasgi.access"]
            return {entry["path"]: entry for entry in map(json.loads, lines)}

        assert await poll(lambda: "/fails" in logged(), 10)
        scrape = (await client.get("/-/metrics")).text
    assert logged()["/fails"]["status"] == 500
    samples = _samples(scrape)
    counted = (
        "minidasgi_distributor_requests_total",
        frozenset({("key", "ops"), ("status", "500")}),
    )
    assert samples[counted] == 1


async def test_a_request_its_distributor_could_not_take_back_never_runs_on_a_late_node(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The no-worker answer is given only for a request taken back from the list (LREM).
    Here the distributor's ACL user may not run LREM, and no Node listens: once
    ``worker_timeout`` passed, the request is still in the list. Its client must not get the
    no-worker answer (that would say it will never run), and a Node started afterwards that
    pops it must not run it (its distributor answered already)."""
    redis = redis_server
    redis.command("ACL", "SETUSER", "nolrem", "on", ">pw", "~ops", "&minidasgi:*", "+ping",
                  "+lpush", "+publish", "+subscribe")  # fmt: skip
    caplog.set_level(logging.INFO, logger="minidasgi")
    runs: list[str] = []

    async def recorded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            runs.append(scope["path"])
        await apps.hello(scope, receive, send)

    url = f"redis://nolrem:pw@127.0.0.1:{redis.port}/0"
    distributor = Distributor(key="ops", url=url, worker_timeout=2.0)
    async with (
        serve_app(distributor) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        answer = await client.get("/late")
        # A Node may have popped it (the distributor cannot tell): not the no-worker
        # answer (405), but the one for a worker that took it and did not answer.
        assert answer.status_code == 504
        # Not "the worker that took the request did not answer": none is known to have.
        assert "could not be taken back from the queue" in answer.text, answer.text
        assert redis.command("LLEN", "ops") == 1  # still there, for a Node to pop
        refused = [
            r.getMessage()
            for r in caplog.records
            if r.name == "minidasgi.distributor" and "cannot take request" in r.getMessage()
        ]
        # One line, saying what to do: not one at the timeout and one more after the grace
        # that follows it (per request, for every request, before).
        (line,) = refused
        assert "NOPERM" in line and "needs LREM" in line
        request_id = line.split()[3]  # "cannot take request <id> back from ..."

        node = Node(url=redis.url, key="ops", app=recorded, lifespan="off")
        async with run_node(node):
            # The Node pops it and drops it unrun: by its deadline, or, asking the
            # distributor (the request predates its pop connection), told to cancel it.
            def told() -> bool:
                return any(
                    r.name == "minidasgi.node" and request_id in r.getMessage()
                    for r in caplog.records
                )

            assert await poll(lambda: runs or told(), 10)
            assert redis.command("LLEN", "ops") == 0
            assert (await client.get("/after")).status_code == 200
    assert runs == ["/after"]


async def test_a_request_taken_back_in_the_background_gets_the_no_worker_answer(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """No Node, fail-fast off (an ACL user without ``PUBSUB``): at ``worker_timeout`` the
    distributor's LREM meets a clean close of its connection (a proxy closes it at the
    LREM's bytes, unsent), and the connection is replaced at once. The take-back in the
    background removes the request from the same server: it never ran, so the no-worker
    answer (it was a 504 "could not be taken back" after the whole grace), nothing left."""
    redis = redis_server
    redis.command("ACL", "SETUSER", "nonumsub", "on", ">pw", "~ops", "&minidasgi:*", "+ping",
                  "+lpush", "+lrem", "+publish", "+subscribe")  # fmt: skip
    caplog.set_level(logging.INFO, logger="minidasgi.distributor")
    with FaultProxy(redis.port) as proxy:
        url = f"redis://nonumsub:pw@127.0.0.1:{proxy.port}/0"
        distributor = Distributor(key="ops", url=url, worker_timeout=2.0)
        async with (
            serve_app(distributor) as base,
            httpx.AsyncClient(base_url=base, timeout=30) as client,
        ):
            answer = asyncio.ensure_future(client.get("/late"))
            assert await poll(lambda: redis.command("LLEN", "ops") == 1, 10)
            (port,) = [
                int(c["addr"].rsplit(":", 1)[1]) for c in client_list(redis) if c["cmd"] == "lpush"
            ]
            proxy.connection_to(port).close_at_next_command()  # the next: the LREM
            response = await answer
    assert (response.status_code, response.text) == (405, "no worker answered within 2 seconds\n")
    assert redis.command("LLEN", "ops") == 0


async def test_a_request_taken_back_once_lrem_is_allowed_again_gets_the_no_worker_answer(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The LREM at ``worker_timeout`` is refused (ACL: no ``LREM``), so the distributor waits
    for an ack that a Node that popped the request would send. ``LREM`` is allowed again
    meanwhile: the LREM after that wait finds the request still queued. It provably never
    ran: the no-worker answer, and nothing left in the list."""
    redis = redis_server
    redis.command("ACL", "SETUSER", "latelrem", "on", ">pw", "~ops", "&minidasgi:*", "+ping",
                  "+lpush", "+publish", "+subscribe")  # fmt: skip
    caplog.set_level(logging.WARNING, logger="minidasgi.distributor")
    url = f"redis://latelrem:pw@127.0.0.1:{redis.port}/0"
    distributor = Distributor(key="ops", url=url, worker_timeout=2.0)
    async with (
        serve_app(distributor) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        answer = asyncio.ensure_future(client.get("/late"))

        def refused() -> bool:
            return any("cannot take request" in r.getMessage() for r in caplog.records)

        assert await poll(refused, 10)
        redis.command("ACL", "SETUSER", "latelrem", "+lrem")
        response = await answer
    assert (response.status_code, response.text) == (405, "no worker answered within 2 seconds\n")
    assert redis.command("LLEN", "ops") == 0
