"""The request buffer, its process-wide budget and the idle bound between body pieces."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from minidasgi.buffering import BodyBuffer, BodyIdle, BufferBudget, receive_within


def _piece(body: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


def test_a_body_within_the_bound_becomes_one_event() -> None:
    budget = BufferBudget(1000)
    buffer = BodyBuffer(_piece(b"ab"), 100, budget)
    assert buffer.wanted
    assert buffer.add(_piece(b"cd")) is True
    assert buffer.add(_piece(b"ef", more=False)) is False
    assert buffer.event() == _piece(b"abcdef", more=False)
    assert budget.used == 6
    buffer.release()
    assert budget.used == 0


def test_reaching_the_bound_stops_reading_with_the_body_incomplete() -> None:
    budget = BufferBudget(1000)
    buffer = BodyBuffer(_piece(b"x" * 60), 100, budget)
    assert buffer.add(_piece(b"y" * 60)) is False  # the piece that crosses it is kept
    assert buffer.event() == _piece(b"x" * 60 + b"y" * 60, more=True)
    buffer.release()
    assert budget.used == 0


def test_an_exhausted_budget_stops_every_buffer_until_bytes_come_back() -> None:
    budget = BufferBudget(100)
    first = BodyBuffer(_piece(b"a" * 80), 1000, budget)
    assert first.wanted
    second = BodyBuffer(_piece(b"b" * 30), 1000, budget)
    assert not second.wanted  # over the budget: queued with what it has
    assert second.event()["body"] == b"b" * 30
    second.release()
    first.release()
    assert budget.used == 0
    assert BodyBuffer(_piece(b"c" * 90), 1000, budget).wanted


async def test_receive_within_returns_what_comes_in_time() -> None:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    asyncio.get_running_loop().call_later(0.01, queue.put_nowait, _piece(b"hi"))
    assert await receive_within(queue.get, 5) == _piece(b"hi")
    queue.put_nowait(_piece(b"there"))
    assert await receive_within(queue.get, None) == _piece(b"there")


async def test_receive_within_raises_body_idle_and_leaves_the_task_uncancelled() -> None:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    with pytest.raises(BodyIdle, match=r"0\.05 seconds"):
        await receive_within(queue.get, 0.05)
    task = asyncio.current_task()
    assert task is not None and getattr(task, "cancelling", lambda: 0)() == 0  # 3.11+
    queue.put_nowait(_piece(b"late"))  # nothing was lost by the cancelled get()
    assert await receive_within(queue.get, 1) == _piece(b"late")


async def test_a_cancel_from_outside_stays_a_cancel() -> None:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.ensure_future(receive_within(queue.get, 10))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
