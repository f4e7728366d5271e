"""Limits a Redis server sets on its clients, reached for real: its idle-client ``timeout``
(``CONFIG SET timeout 1``, as managed services set it) closing a distributor's or a Node's
idle command connection, its ``maxmemory`` under ``noeviction`` refusing every LPUSH
(``-OOM``), a replica refusing it (``-READONLY``) and an error reply that does not prove
the LPUSH did not run, its ``client-output-buffer-limit`` for pub/sub dropping a distributor's or a
Node's subscriber in the middle of transfers, and ``CLIENT PAUSE ... WRITE`` holding every
write past the worker timeout. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from minidasgi import Node, create_distributor
from minidasgi.resp import client as resp_client

from . import apps
from .faultproxy import FaultProxy
from .redis_server import RedisFactory, RedisServer, client_list
from .stack import NodeProcess, distributor_process, poll, run_node, serve_app

pytestmark = pytest.mark.timeout(60)


def _acked(distributor: Any) -> int:
    """How many of ``distributor``'s requests a Node took (acked)."""
    return sum(e.node is not None for e in distributor._exchanges.values())


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


async def test_a_request_whose_lpush_meets_an_idle_close_is_not_run_twice(
    redis_server: RedisServer,
) -> None:
    """Redis closes the distributor's command connection (its idle ``timeout``) just as a
    request's LPUSH arrives on it, unread: a proxy closes that connection cleanly at the
    LPUSH's bytes, which never reach Redis. From the distributor this looks the same as an
    LPUSH that ran and whose copy a Node popped, its ack late (the LREM finds nothing either
    way): it is not pushed again, however long the connection was idle (a second run would
    be possible), and the client gets 503 as for any LPUSH that failed; nothing runs."""
    runs: list[str] = []

    async def recorded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            runs.append(scope["path"])
        await apps.hello(scope, receive, send)

    with FaultProxy(redis_server.port) as proxy:
        distributor = create_distributor(url=proxy.url(), key="closing")
        node = Node(url=redis_server.url, app=recorded, key="closing", lifespan="off")
        async with serve_app(distributor) as base, run_node(node):
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                assert (await client.get("/warm")).status_code == 200
                (port,) = [
                    int(c["addr"].rsplit(":", 1)[1])
                    for c in client_list(redis_server)
                    if c["cmd"] == "lpush"
                ]
                proxy.connection_to(port).close_at_next_command()
                # Idle long enough (a second) for Redis' ``timeout`` to close it: no reply
                # read, no command written on it meanwhile. It proves nothing all the same.
                await asyncio.sleep(1.2)
                response = await client.get("/one")
                assert response.status_code == 503
                assert (await client.get("/two")).status_code == 200  # the replacement serves
    assert runs == ["/warm", "/two"]
    assert redis_server.command("LLEN", "closing") == 0


def _command_connection(proxy: FaultProxy, server: RedisServer) -> Any:
    """The proxied connection of the one client through ``proxy`` that is not subscribed:
    a distributor's command connection."""
    ports = {c.upstream_port for c in proxy.connections()}
    (port,) = [
        port
        for c in client_list(server)
        if c["sub"] == "0" and (port := int(c["addr"].rsplit(":", 1)[1])) in ports
    ]
    return proxy.connection_to(port)


def _inbox_filled(distributor: Any) -> bool:
    """Whether a request of ``distributor`` has something (an ack) waiting in its inbox."""
    return any(not e.inbox.empty() for e in distributor._exchanges.values())


def _recorded(runs: list[str]) -> Any:
    """``apps.hello``, noting the path of each HTTP request it serves in ``runs``."""

    async def recorded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            runs.append(scope["path"])
        await apps.hello(scope, receive, send)

    return recorded


async def test_a_request_whose_lpush_ran_before_a_clean_close_never_runs_twice(
    redis_server: RedisServer,
) -> None:
    """A proxy forwards a request's LPUSH (Redis runs it) and then closes the distributor's
    command connection cleanly, the reply dropped, on a connection that was not idle. A
    Node pops that copy at once, but its ack is held (its publisher's link stalled) past
    the distributor's LREM, which finds nothing: a copy may run, so the request is not
    pushed again (it was, and ran twice). It runs once."""
    runs: list[str] = []
    with FaultProxy(redis_server.port) as proxy, FaultProxy(redis_server.port) as node_proxy:
        distributor = create_distributor(url=proxy.url(), key="forwarded")
        node = Node(url=node_proxy.url(), app=_recorded(runs), key="forwarded", lifespan="off")
        async with serve_app(distributor) as base, run_node(node):
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                assert (await client.get("/warm")).status_code == 200
                _command_connection(proxy, redis_server).close_after_next_command()
                node_proxy.stall(up=True, down=False)  # the Node pops; its ack is held
                request = asyncio.ensure_future(client.get("/once"))
                assert await poll(lambda: "/once" in runs, 10)
                node_proxy.resume()
                response = await request
                # The Node is served a later request: any copy of "/once" was popped before.
                assert (await client.get("/after")).status_code == 200
                assert runs == ["/warm", "/once", "/after"]
                assert redis_server.command("LLEN", "forwarded") == 0
                # The answer of a request whose LPUSH failed with Redis up, as ever.
                assert response.status_code == 503, response.text


async def test_a_request_whose_lpush_ran_before_a_clean_close_is_taken_back_and_pushed_again(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The LPUSH ran before the clean close, on a connection that was not idle, and no Node
    popped it: the LREM removes it, so no copy can run, and it is pushed again on the
    replacement connection. A Node started then serves it once (main answered 503)."""
    caplog.set_level(logging.INFO, logger="minidasgi.distributor")
    runs: list[str] = []
    with FaultProxy(redis_server.port) as proxy:
        distributor = create_distributor(url=proxy.url(), key="unpopped", worker_timeout=10)
        node = Node(url=redis_server.url, app=_recorded(runs), key="unpopped", lifespan="off")
        async with serve_app(distributor) as base:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                _command_connection(proxy, redis_server).close_after_next_command()
                request = asyncio.ensure_future(client.get("/once"))
                assert await poll(lambda: "pushed again" in caplog.text, 10)
                assert redis_server.command("LLEN", "unpopped") == 1
                async with run_node(node):
                    response = await request
                assert (response.status_code, response.text) == (200, "Hello World!")
    assert runs == ["/once"]
    assert redis_server.command("LLEN", "unpopped") == 0


async def test_an_ack_during_the_check_before_pushing_again_is_relayed(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LPUSH ran before the clean close (as above), and the Node's ack arrives while
    the distributor waits for the replacement connection (held until then): the request
    runs, and its response is relayed, not answered 503."""
    runs: list[str] = []
    with FaultProxy(redis_server.port) as proxy, FaultProxy(redis_server.port) as node_proxy:
        distributor = create_distributor(url=proxy.url(), key="acked")
        node = Node(url=node_proxy.url(), app=_recorded(runs), key="acked", lifespan="off")
        async with serve_app(distributor) as base, run_node(node):
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                assert (await client.get("/warm")).status_code == 200
                # The replacement's wait outlasts the test's steps (at most 10 s).
                monkeypatch.setattr(resp_client, "REOPEN_WAIT", 10.0)
                _command_connection(proxy, redis_server).close_after_next_command()
                proxy.stall_new(up=True, down=True)  # the replacement connection waits
                node_proxy.stall(up=True, down=False)  # the Node pops; its ack is held
                request = asyncio.ensure_future(client.get("/once"))
                assert await poll(lambda: "/once" in runs, 10)
                node_proxy.resume()  # the ack comes while the replacement is held
                assert await poll(lambda: _inbox_filled(distributor), 10)
                proxy.resume()
                response = await request
                assert (response.status_code, response.text) == (200, "Hello World!")
    assert runs == ["/warm", "/once"]


async def test_redis_out_of_memory_refuses_new_requests_at_once(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Past ``maxmemory`` (``noeviction``) Redis refuses every LPUSH with ``-OOM`` while
    PUBLISH still works: new requests get 503 saying so at once (a worker timeout of a
    minute would outlast the client's 10 s), the error is logged once, responses in flight
    end, and service comes back with the memory, leaving no key."""
    caplog.set_level(logging.WARNING, logger="minidasgi.distributor")
    distributor = create_distributor(url=redis_server.url, key="oom", worker_timeout=60)
    node = Node(url=redis_server.url, app=apps.slow, key="oom", lifespan="off")
    async with serve_app(distributor) as base, run_node(node):
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            assert (await client.get("/?1")).status_code == 200
            streaming = [asyncio.ensure_future(client.get("/?10")) for _ in range(3)]
            assert await poll(lambda: _acked(distributor) == 3, 10)
            redis_server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
            redis_server.command("CONFIG", "SET", "maxmemory", "1")
            try:
                refused = await asyncio.gather(*(client.get("/?1") for _ in range(5)))
                assert [(r.status_code, r.text) for r in refused] == [
                    (503, "the request queue (Redis) is out of memory\n")
                ] * 5
                ended = await asyncio.gather(*streaming)
                assert [r.status_code for r in ended] == [200] * 3
                assert all(r.text.endswith("9\ndone\n") for r in ended)
            finally:
                redis_server.command("CONFIG", "SET", "maxmemory", "0")
            assert (await client.get("/?1")).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "minidasgi.distributor"]
    assert len(lines) == 1 and "OOM" in lines[0], lines
    assert distributor.metrics.refusals.values.get(("redis_refused",)) == 5
    assert redis_server.command("KEYS", "*") == []


async def test_a_replica_refusing_writes_counts_as_unreachable_and_nothing_is_taken_back(
    redis_server: RedisServer, redis_factory: RedisFactory
) -> None:
    """A distributor pointed at a replica (as one is for a moment in a failover, until it
    switches): every LPUSH gets ``-READONLY``, which Redis gives before running a command.
    The requests are answered 503 "unreachable" at once and counted ``redis_unreachable``,
    where a failover is looked for (not ``redis_refused``), with no take-back sent."""
    replica = redis_factory()
    replica.command("REPLICAOF", "127.0.0.1", str(redis_server.port))
    distributor = create_distributor(url=replica.url, key="ro", worker_timeout=60)
    async with serve_app(distributor) as base:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            assert await poll(lambda: distributor.ready, 10)
            refused = await asyncio.gather(*(client.get("/") for _ in range(3)))
    assert [(r.status_code, r.text) for r in refused] == [
        (503, "the request queue (Redis) is unreachable\n")
    ] * 3
    counts = distributor.metrics.refusals.values
    assert (counts[("redis_unreachable",)], counts[("redis_refused",)]) == (3, 0)
    assert "cmdstat_lrem" not in _commandstats(replica)


async def test_an_error_reply_that_may_follow_the_lpush_is_taken_back(
    redis_factory: RedisFactory,
) -> None:
    """An error reply not known to mean "not run" (a proxy in front of Redis may answer
    "-ERR Connection timed out" after forwarding the LPUSH; here Redis itself answers
    "-ERR unknown command", LPUSH being renamed, as no proxy at hand answers after
    forwarding): the request is answered 503 "refused", counted ``redis_refused``, and
    taken back (``LREM``) at once, in case it ran."""
    server = redis_factory(extra_args=["--rename-command", "LPUSH", "LPUSH-RENAMED"])
    distributor = create_distributor(url=server.url, key="err", worker_timeout=60)
    async with serve_app(distributor) as base:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            assert await poll(lambda: distributor.ready, 10)
            refused = await client.get("/")
            assert (refused.status_code, refused.text) == (
                503,
                "the request queue (Redis) refused the request\n",
            )
            assert await poll(lambda: "cmdstat_lrem" in _commandstats(server), 10)
    assert distributor.metrics.refusals.values[("redis_refused",)] == 1


def _commandstats(server: RedisServer) -> str:
    info = server.command("INFO", "commandstats")
    assert isinstance(info, bytes)
    return info.decode()


async def _transfer(client: httpx.AsyncClient, upload: bool) -> str:
    """A 64 MiB download or upload (``apps.transfer``); how it ended: its status, or
    'aborted' for a response cut short."""
    size = 64 << 20

    async def body() -> Any:
        for _ in range(size >> 16):
            yield b"y" * 65536

    try:
        if upload:
            return str((await client.post("/up", content=body())).status_code)
        async with client.stream("GET", f"/?{size}") as response:
            async for _ in response.aiter_bytes():
                pass
            return str(response.status_code)
    except (httpx.RemoteProtocolError, httpx.ReadError):
        return "aborted"


@pytest.mark.parametrize("side", ["distributor", "node"])
async def test_a_subscriber_over_its_output_buffer_limit_ends_its_transfers(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, side: str
) -> None:
    """``client-output-buffer-limit pubsub 256kb 128kb 1``: the body pieces of 4 concurrent
    downloads (to the distributor's subscriber) or uploads (to the Node's) pass the limit,
    and Redis drops that subscriber with everything in flight on it. Every transfer ends
    (502, or an aborted response), the subscriber comes back, and the next request is
    served."""
    caplog.set_level(logging.WARNING, logger="minidasgi.resp.pubsub")
    redis_server.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 256kb 128kb 1")
    distributor = create_distributor(url=redis_server.url, key="obuf")
    node = Node(url=redis_server.url, app=apps.transfer, key="obuf", lifespan="off")
    async with serve_app(distributor) as base, run_node(node):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            ends = await asyncio.gather(*(_transfer(client, side == "node") for _ in range(4)))
            assert set(ends) <= {"502", "aborted"}, ends
            # The subscriber comes back (until then a request gets 503, as it should: it came
            # too soon for this test once the suite's server sockets set TCP_NODELAY).
            assert await poll(lambda: distributor.ready, 10)
            response = await client.get("/?100")
            assert (response.status_code, len(response.content)) == (200, 100)
    assert any("lost its connection" in r.getMessage() for r in caplog.records)
    assert not distributor._exchanges and not node._jobs


@pytest.mark.parametrize("moment", ["queued", "pushed", "acking"])
async def test_a_write_pause_past_the_worker_timeout_never_runs_a_no_worker_answer(
    redis_server: RedisServer, moment: str
) -> None:
    """``CLIENT PAUSE 2500 WRITE`` (LPUSH, the pops, LREM and PUBLISH all wait in Redis)
    with a ``worker_timeout`` of 1 s: while requests wait behind a busy Node of
    concurrency 1 (queued), while their LPUSHes are held (pushed), or just after a pop (its
    ACK held). Whatever each request gets, none answered with the no-worker status runs,
    none runs twice, and every one ends."""
    ran: list[str] = []
    release = asyncio.Event()

    async def recorder(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        ran.append(scope["path"])
        await asyncio.wait_for(release.wait(), 20)
        await apps.hello(scope, receive, send)

    distributor = create_distributor(url=redis_server.url, key="pause", worker_timeout=1)
    node = Node(url=redis_server.url, app=recorder, key="pause", lifespan="off", concurrency=1)
    async with serve_app(distributor) as base, run_node(node):
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            release.set()
            assert (await client.get("/warm")).status_code == 200
            release.clear()
            if moment == "pushed":
                redis_server.command("CLIENT", "PAUSE", "2500", "WRITE")
            requests = {f"/{i}": asyncio.ensure_future(client.get(f"/{i}")) for i in range(4)}
            if moment != "pushed":
                assert await poll(lambda: len(ran) == 2, 10)  # the first popped, and started
                if moment == "queued":  # the others wait in the list
                    assert await poll(lambda: redis_server.command("LLEN", "pause") == 3, 10)
                redis_server.command("CLIENT", "PAUSE", "2500", "WRITE")
            await asyncio.sleep(0.5)
            release.set()
            statuses = {path: (await r).status_code for path, r in requests.items()}
            # Long enough to see a late run: what the pause held ran at its end.
            await asyncio.sleep(0.5)
    no_worker = {path for path, status in statuses.items() if status == 405}
    assert not no_worker & set(ran), (statuses, ran)
    assert len(ran) == len(set(ran)), ran
    assert set(statuses.values()) <= {200, 405, 504}, statuses
    assert redis_server.command("KEYS", "*") == []
