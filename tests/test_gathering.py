"""Piece gathering against a fake ``receive()``: what is joined, what is handed back, and
that nothing is lost or reordered. No timings: a paused client is a receive() that never
returns, and the test only checks what came out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from minidasgi.asgi import Message
from minidasgi.codec import Gathered, decode, encode_parts
from minidasgi.gathering import GATHER_FROM, gather_body

KIB = 1024
PIECE = 512 * KIB


def _body(size: int, more: bool = True, fill: bytes = b"x") -> Message:
    return {"type": "http.request", "body": fill * size, "more_body": more}


def _receiver(events: list[Message]) -> tuple[Callable[[], Awaitable[Message]], list[Message]]:
    """A receive() that hands out ``events`` in order, then waits forever (a paused client);
    the list it returns holds what was not received."""
    left = list(events)

    async def receive() -> Message:
        if not left:
            await asyncio.Event().wait()
        return left.pop(0)

    return receive, left


async def test_bulk_reads_are_joined_into_one_piece() -> None:
    receive, left = _receiver([_body(256 * KIB, fill=b"b"), _body(256 * KIB, fill=b"c")])
    event, left_over = await gather_body(receive, _body(256 * KIB, fill=b"a"), PIECE)
    assert bytes(event["body"]) == b"a" * 256 * KIB + b"b" * 256 * KIB
    assert event["more_body"] is True
    assert left_over is None
    assert len(left) == 1  # the next piece's part stays with the server


async def test_a_read_that_would_pass_the_piece_size_is_handed_back() -> None:
    third = _body(200 * KIB, fill=b"c")
    receive, left = _receiver([_body(200 * KIB, fill=b"b"), third])
    event, left_over = await gather_body(receive, _body(200 * KIB, fill=b"a"), PIECE)
    assert bytes(event["body"]) == b"a" * 200 * KIB + b"b" * 200 * KIB
    assert left_over is third
    assert left == []


async def test_the_end_of_the_body_ends_the_piece() -> None:
    receive, _ = _receiver([_body(100 * KIB, more=False, fill=b"b")])
    event, left_over = await gather_body(receive, _body(100 * KIB, fill=b"a"), PIECE)
    assert {**event, "body": bytes(event["body"])} == {
        "type": "http.request",
        "body": b"a" * 100 * KIB + b"b" * 100 * KIB,
        "more_body": False,
    }
    assert left_over is None


async def test_a_disconnect_is_handed_back_after_the_piece() -> None:
    disconnect: dict[str, Any] = {"type": "http.disconnect"}
    receive, _ = _receiver([_body(100 * KIB, fill=b"b"), disconnect])
    event, left_over = await gather_body(receive, _body(100 * KIB, fill=b"a"), PIECE)
    assert bytes(event["body"]) == b"a" * 100 * KIB + b"b" * 100 * KIB
    assert left_over is disconnect


async def test_small_events_are_never_waited_for() -> None:
    receive, left = _receiver([_body(10)])
    first = _body(GATHER_FROM - 1)
    assert await gather_body(receive, first, PIECE) == (first, None)
    assert len(left) == 1
    # Nor after a small one joined a large one: the client slowed down.
    receive, left = _receiver([_body(10, fill=b"b"), _body(10)])
    event, left_over = await gather_body(receive, _body(GATHER_FROM), PIECE)
    assert bytes(event["body"]) == b"x" * GATHER_FROM + b"b" * 10
    assert left_over is None
    assert len(left) == 1


async def test_whole_pieces_and_last_events_are_not_waited_after() -> None:
    receive, left = _receiver([_body(10)])
    for first in (_body(PIECE), _body(200 * KIB, more=False)):
        assert await gather_body(receive, first, PIECE) == (first, None)
    assert len(left) == 1


async def test_a_paused_client_gets_what_came_relayed() -> None:
    receive, _ = _receiver([_body(100 * KIB, fill=b"b")])  # then nothing more
    event, left_over = await gather_body(receive, _body(100 * KIB, fill=b"a"), PIECE, 0.01)
    assert bytes(event["body"]) == b"a" * 100 * KIB + b"b" * 100 * KIB
    assert event["more_body"] is True
    assert left_over is None


async def test_a_paused_client_loses_nothing() -> None:
    # The wait cancels a receive() in progress: the server keeps what it has not returned.
    later = _body(100 * KIB, fill=b"b")
    arrived = asyncio.Event()

    async def receive() -> Message:
        await arrived.wait()
        return later

    first = _body(100 * KIB, fill=b"a")
    assert await gather_body(receive, first, PIECE, 0.01) == (first, None)
    arrived.set()
    assert await receive() is later


async def test_cancelling_the_caller_while_it_waits_is_not_swallowed() -> None:
    async def receive() -> Message:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    task = asyncio.ensure_future(gather_body(receive, _body(100 * KIB), PIECE, 60))
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_gathered_piece_keeps_its_parts_uncopied() -> None:
    # Joining the parts copied every byte of an upload once more before the codec copied it
    # into the message: the piece holds the very bytes objects received, and the codec
    # carries them as one bytes value.
    first, second = _body(200 * KIB, fill=b"a"), _body(200 * KIB, fill=b"b")
    receive, _ = _receiver([second])
    event, _ = await gather_body(receive, first, PIECE, 0.01)
    body = event["body"]
    assert isinstance(body, Gathered)
    assert body.parts[0] is first["body"] and body.parts[1] is second["body"]
    assert len(body) == 400 * KIB
    parts = encode_parts([event])
    assert any(part is first["body"] for part in parts)
    assert any(part is second["body"] for part in parts)
    assert decode(b"".join(parts)) == [
        {"type": "http.request", "body": b"a" * 200 * KIB + b"b" * 200 * KIB, "more_body": True}
    ]
