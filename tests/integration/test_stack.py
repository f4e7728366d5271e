"""The helpers of ``stack`` that run the real thing: what they hand a test is what it asked for."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from . import apps, stack
from .redis_server import RedisServer
from .stack import NodeProcess, distributor_process


@pytest.fixture
def squatter(monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisServer]:
    """Another process (a redis-server) on the first port ``stack.free_port`` hands out."""
    server = RedisServer()
    server.start()
    try:
        ports = iter([server.port])
        real_free_port = stack.free_port
        monkeypatch.setattr(stack, "free_port", lambda: next(ports, None) or real_free_port())
        yield server
    finally:
        server.kill()
        server.close()


async def test_distributor_process_is_never_someone_elses_port(
    redis_server: RedisServer, squatter: RedisServer
) -> None:
    """The port a distributor is given may be taken by another process before the child binds
    it (free_port lets go of it first; on a loaded machine the child takes seconds to start,
    while other suites start servers on free ports). Here another redis-server holds it: a
    probe's connection succeeds there all the same, and the test's request went to it, which
    closed the connection without a word (what Redis does with "Host:"). The helper must see
    its own child listen, and start it again on another port once the bind is refused."""
    with NodeProcess(redis_server.url, "q"):
        async with distributor_process(redis_server.url, "q") as (base, distributor):
            host, port = base.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            finally:
                writer.close()
            assert head.startswith(b"HTTP/1.1 200"), head
            assert base != f"http://127.0.0.1:{squatter.port}"
            assert distributor.returncode is None


async def test_serve_hypercorn_is_never_someone_elses_port(squatter: RedisServer) -> None:
    """The same for hypercorn in this process: another redis-server holds the first port it is
    given. The probe used to connect, which reached that server as soon as it tried (before
    hypercorn had even tried to bind); the helper must see this process listen, and serve on
    another port once the bind is refused."""
    async with stack.serve_hypercorn(apps.hello) as base:
        assert base != f"http://127.0.0.1:{squatter.port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            response = await client.get("/")
        assert response.status_code == 200
