"""Slots: a Node's free slots, taken many at once without waiting, waited for safely."""

from __future__ import annotations

import asyncio

import pytest

from minidasgi.slots import Slots


def test_take_gives_what_is_free_up_to_the_most_asked_and_release_gives_it_back() -> None:
    slots = Slots(5)
    assert slots.take(3) == 3 and slots.free == 2
    assert slots.take(32) == 2 and slots.free == 0
    assert slots.take(1) == 0 and slots.take(0) == 0 and slots.take(-1) == 0
    slots.release(4)
    slots.release(0)  # nothing to give back (a pop that started all it held)
    assert slots.free == 4
    slots.release()
    assert slots.free == 5


def test_never_more_free_than_its_size() -> None:
    slots = Slots(2)
    slots.take(1)
    with pytest.raises(RuntimeError):
        slots.release(2)
    assert slots.free == 1
    with pytest.raises(ValueError):
        Slots(0)


async def test_wait_returns_at_once_with_a_free_slot_and_takes_none() -> None:
    slots = Slots(1)
    await slots.wait()
    assert slots.free == 1


async def test_a_release_wakes_every_waiter_and_take_decides_who_gets_the_slot() -> None:
    slots = Slots(1)
    assert slots.take(1) == 1
    waiting = [asyncio.ensure_future(slots.wait()) for _ in range(2)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiting)
    slots.release()
    await asyncio.wait_for(asyncio.gather(*waiting), 1)
    assert slots.take(1) == 1 and slots.take(1) == 0  # one got it; the other waits again


async def test_a_cancelled_wait_takes_nothing_and_leaves_no_waiter() -> None:
    slots = Slots(1)
    slots.take(1)
    waiting = asyncio.ensure_future(slots.wait())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not slots._waiters
    slots.release()
    assert slots.free == 1
