"""The README's trust model, for real: what Redis ACLs keep apart, and what they do not.

* Two tenants share one redis-server, each with the per-tenant ACL users of the README's
  "Security and trust" recipe (the ``ACL SETUSER`` lines are read from the README and run as
  written): each serves its own traffic, and tenant B's credentials, used over a plain RESP
  connection, can neither read tenant A's traffic nor forge it (NOPERM for each attempt).
* A request pushed by anyone allowed to ``LPUSH`` reaches the app with the client address,
  scheme and headers the pusher wrote: the README says apps must treat them like headers
  from a reverse proxy; this shows why.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from minidasgi import Distributor, Node, wire
from minidasgi.resp import Connection, ReplyError, connect
from minidasgi.resp.pubsub import Subscriber

from .redis_server import RedisFactory, RedisServer
from .stack import poll, run_node, serve_app

pytestmark = pytest.mark.timeout(60)

README = Path(__file__).resolve().parents[2] / "README.md"
PASSWORDS = {"dist": "Dp#4/x?@%", "node": "Np#4/y?@%"}  # URL delimiters, unencoded


def recipe(tenant: str) -> list[list[str]]:
    """The README's ``ACL SETUSER`` lines for ``tenant`` (written there for ``tenant-a``),
    with this test's passwords."""
    lines = [
        line.strip()
        for line in README.read_text().splitlines()
        if line.startswith("ACL SETUSER tenant-a-")
    ]
    assert len(lines) == 2, "the README's recipe has one user for distributors, one for Nodes"
    commands = []
    for line in lines:
        line = line.replace("tenant-a", tenant)
        line = line.replace("DIST-PASSWORD", PASSWORDS["dist"])
        line = line.replace("NODE-PASSWORD", PASSWORDS["node"])
        commands.append(shlex.split(line))
    return commands


def url(server: RedisServer, tenant: str, role: str) -> str:
    return f"redis://{tenant}-{role}:{PASSWORDS[role]}@127.0.0.1:{server.port}/0"


def app_saying(text: bytes) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200})
            await send({"type": "http.response.body", "body": text})

    return app


@contextlib.asynccontextmanager
async def tenant(server: RedisServer, name: str) -> AsyncIterator[tuple[str, Distributor, Node]]:
    """Tenant ``name``'s distributor (served by uvicorn) and Node, under its own ACL users,
    prefix and queue ``NAME:web``; yields ``(base_url, distributor, node)``."""
    key = f"{name}:web"
    distributor = Distributor(
        key=key, url=url(server, name, "dist"), channel_prefix=name, worker_timeout=3
    )
    node = Node(
        url=url(server, name, "node"),
        app=app_saying(name.encode()),
        key=key,
        channel_prefix=name,
        lifespan="off",
        pop_timeout=1,  # no CLIENT UNBLOCK in the recipe: a stop waits for the pop
    )
    async with run_node(node), serve_app(distributor) as base:
        yield base, distributor, node


async def refused(connection: Connection, *command: object) -> str:
    """The error code Redis answers ``command`` with (the test fails if it is accepted)."""
    with pytest.raises(ReplyError) as caught:
        await asyncio.wait_for(connection.execute(*command), 5)
    return caught.value.code


def acl_log(server: RedisServer) -> list[dict[str, Any]]:
    entries = server.command("ACL", "LOG")
    assert isinstance(entries, list)
    logged = []
    for entry in entries:
        fields = dict(zip(entry[::2], entry[1::2], strict=True))
        logged.append({k.decode(): v for k, v in fields.items()})
    return logged


async def test_tenants_sharing_one_redis_are_isolated(redis_factory: RedisFactory) -> None:
    users = {f"{t}-{r}": PASSWORDS[r] for t in ("tenant-a", "tenant-b") for r in PASSWORDS}
    server = redis_factory(acl_users=users)  # every right at first: the recipe resets them
    for name in ("tenant-a", "tenant-b"):
        for command in recipe(name):
            assert server.command(*command) == b"OK"
    server.command("ACL", "LOG", "RESET")

    async with tenant(server, "tenant-a") as (base_a, dist_a, node_a):
        async with tenant(server, "tenant-b") as (base_b, _, _):
            async with httpx.AsyncClient(timeout=10) as client:
                answers = await asyncio.gather(
                    *(client.get(f"{base}/x") for base in (base_a, base_b, base_a, base_b))
                )
            assert [(r.status_code, r.text) for r in answers] == [
                (200, "tenant-a"),
                (200, "tenant-b"),
            ] * 2
            # Serving needed nothing the recipe refuses, but the CLIENT ID a Node asks once
            # (for CLIENT UNBLOCK at stop, left out on purpose) and does without.
            assert {(e["username"], e["object"]) for e in acl_log(server)} <= {
                (b"tenant-a-node", b"client|id"),
                (b"tenant-b-node", b"client|id"),
            }
            server.command("ACL", "LOG", "RESET")

            # Tenant B's Node credentials (and its distributor's), on plain connections, against
            # what tenant A's traffic travels on: A's queue and both of A's channels.
            queue = "tenant-a:web"
            channels = [dist_a.channel, node_a.channel]
            assert all(channel.startswith("tenant-a:") for channel in channels)
            attempts: list[tuple[object, ...]] = []
            for channel in channels:
                attempts += [("SUBSCRIBE", channel), ("PUBLISH", channel, b"forged")]
            attempts += [
                ("PSUBSCRIBE", "tenant-a:*"),
                ("PSUBSCRIBE", "*"),
                ("RPOP", queue),
                ("BRPOP", queue, 0.1),
                ("LPUSH", queue, b"forged"),
            ]
            codes = {}
            for role in ("node", "dist"):
                for attempt in attempts:
                    # A fresh connection per attempt: an accepted SUBSCRIBE would change its mode.
                    connection = await asyncio.wait_for(connect(url(server, "tenant-b", role)), 5)
                    try:
                        codes[(role, *attempt[:2])] = await refused(connection, *attempt)
                    finally:
                        await connection.close()
            assert set(codes.values()) == {"NOPERM"}, codes
            logged = acl_log(server)
            assert logged and {entry["username"] for entry in logged} <= {
                b"tenant-b-node",
                b"tenant-b-dist",
            }

            # Tenant A is untouched: nothing was pushed, and it still serves.
            assert server.command("LLEN", queue) == 0
            server.command("ACL", "LOG", "RESET")
            async with httpx.AsyncClient(timeout=10) as client:
                again = await client.get(f"{base_a}/y")
            assert (again.status_code, again.text) == (200, "tenant-a")
    # Nor did stopping need anything the recipe refuses.
    assert acl_log(server) == []


async def test_a_pushed_request_reaches_the_app_as_the_pusher_wrote_it(
    redis_server: RedisServer,
) -> None:
    """No distributor at all: whoever may LPUSH writes the scope, and the app believes it."""
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope)
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"ok"})

    reply = wire.new_channel("minidasgi", 0, "dist")  # the pusher's own channel
    received: list[bytes] = []
    subscriber = Subscriber(redis_server.url, on_message=lambda _, data: received.append(data))
    subscriber.start()
    node = Node(url=redis_server.url, app=app, key="web", lifespan="off", pop_timeout=1)
    pusher = await asyncio.wait_for(connect(redis_server.url), 5)
    try:
        await asyncio.wait_for(subscriber.subscribe(reply), 5)
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "https",
            "path": "/admin",
            "raw_path": b"/admin",
            "query_string": b"",
            "root_path": "",
            "headers": [[b"host", b"bank.example"], [b"x-forwarded-for", b"10.0.0.1"]],
            "client": ["203.0.113.7", 4444],
            "server": ["bank.example", 443],
        }
        events = [{"type": "http.request", "body": b"", "more_body": False}]
        envelope = wire.Envelope(wire.new_request_id(), reply, time.time() + 30, scope, events)
        async with run_node(node):
            await pusher.lpush("web", envelope.encode())
            # The ACK and the response travel in one batch frame (or apart).
            messages = lambda: [m for data in received for m in wire.split_frame(data)]  # noqa: E731
            assert await poll(lambda: len(seen) == 1 and len(messages()) >= 2, timeout=10)
    finally:
        await pusher.close()
        await subscriber.close()
    (got,) = seen
    assert (got["scheme"], got["path"]) == ("https", "/admin")
    assert list(got["client"]) == ["203.0.113.7", 4444]
    assert list(got["server"]) == ["bank.example", 443]
    assert [list(h) for h in got["headers"]] == scope["headers"]
    kinds = [wire.unpack(data)[0] for data in messages()]
    assert kinds[0] == wire.ACK and wire.SEND in kinds  # and the response went to the pusher
