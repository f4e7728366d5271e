"""Unit tests of the Node (no network): the scope it makes of a decoded one, a job's sends."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from minidasgi import wire
from minidasgi.node import Node, _Job, _local_scope


def test_the_apps_scope_has_tuples_where_asgi_servers_give_tuples() -> None:
    state = {"db": object()}
    scope: dict[str, Any] = {
        "type": "http",
        "headers": [[b"host", b"a"], [b"x", b"1"]],
        "client": ["127.0.0.1", 5000],
        "server": ["127.0.0.1", 8000],
    }
    local = _local_scope(scope, state)
    assert local["headers"] == [(b"host", b"a"), (b"x", b"1")]
    assert all(type(pair) is tuple for pair in local["headers"])
    assert local["client"] == ("127.0.0.1", 5000)
    assert local["server"] == ("127.0.0.1", 8000)
    assert local["state"] == state and local["state"] is not state


def test_headers_not_as_decoded_keep_only_their_pairs() -> None:
    # The general decoder may give anything there: only lists and tuples are kept, as tuples.
    for headers, kept in [
        ([[b"a", b"1"], "junk", (b"b", b"2")], [(b"a", b"1"), (b"b", b"2")]),
        ([("a", "1")], [("a", "1")]),
        ([5, [b"c", b"3"]], [(b"c", b"3")]),
        ([], []),
    ]:
        assert _local_scope({"type": "http", "headers": headers}, {})["headers"] == kept


async def _ws_job(window: int) -> tuple[Any, list[bytes]]:
    """A WebSocket request's job on a Node that is not serving: what it posts is kept."""
    node = Node(app=lambda scope, receive, send: None, key="k", lifespan="off")
    node.loop = asyncio.get_running_loop()
    posted: list[bytes] = []

    def post(channel: str, message: wire.Packed, **_: Any) -> asyncio.Future[int]:
        posted.append(message if type(message) is bytes else b"".join(message))
        future: asyncio.Future[int] = node.loop.create_future()  # type: ignore[union-attr]
        future.set_result(1)
        return future

    node.outbox.post = post  # type: ignore[method-assign]
    scope = {"type": "websocket", "path": "/", "headers": []}
    envelope = wire.Envelope("r" * 32, "minidasgi:0:dist:x", time.time() + 5, scope, [], window)
    return _Job(node, envelope), posted


async def test_a_message_sent_while_another_waits_for_credit_waits_for_its_last_piece() -> None:
    # A sender alone takes no mutex (``_in_send``); one that finds another inside makes it.
    job, posted = await _ws_job(window=2)
    await job.send({"type": "websocket.accept"})  # one credit of two
    long = asyncio.create_task(job.send({"type": "websocket.send", "bytes": b"a" * 200_000}))
    await asyncio.sleep(0)
    assert len(posted) == 2  # the accept, the long message's first piece: no credit left
    short = asyncio.create_task(job.send({"type": "websocket.send", "bytes": b"b" * 10}))
    later = asyncio.create_task(job.send({"type": "websocket.send", "bytes": b"c" * 10}))
    job.window.grant(1)  # the short message's task runs first: it must wait for its turn
    for _ in range(4):
        await asyncio.sleep(0)
    job.window.grant(2)
    await asyncio.wait_for(asyncio.gather(long, short, later), 5)
    order = [next(c for c in "abc" if c.encode() * 10 in data) for data in posted[1:]]
    assert order == ["a", "a", "b", "c"]
    assert job._sending is not None and not job._sending.locked()
    job.window.grant(1)
    send = job.send({"type": "websocket.send", "bytes": b"d" * 10})
    await asyncio.wait_for(send, 5)  # the turn was given back
    assert len(posted) == 6
