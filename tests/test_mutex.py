"""Mutex: one task at a time, first come first served, safe to cancel."""

from __future__ import annotations

import asyncio

import pytest

from minidasgi.mutex import Mutex


async def test_try_acquire_takes_a_free_mutex_only() -> None:
    mutex = Mutex()
    assert mutex.try_acquire() and mutex.locked()
    assert not mutex.try_acquire()
    mutex.release()
    assert not mutex.locked()
    async with mutex:
        assert mutex.locked() and not mutex.try_acquire()
    assert not mutex.locked()


async def test_waiters_enter_one_at_a_time_in_arrival_order() -> None:
    mutex = Mutex()
    order: list[int] = []
    inside = 0

    async def section(n: int) -> None:
        nonlocal inside
        async with mutex:
            inside += 1
            assert inside == 1
            order.append(n)
            await asyncio.sleep(0)
            inside -= 1

    assert mutex.try_acquire()
    tasks = [asyncio.ensure_future(section(n)) for n in range(4)]
    await asyncio.sleep(0)
    assert not mutex.try_acquire()  # held, and waiters queue behind
    mutex.release()
    assert not mutex.try_acquire()  # the first waiter is woken: no cutting in
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert order == [0, 1, 2, 3] and not mutex.locked()


async def test_a_waiter_cancelled_while_waiting_leaves_the_turn_to_the_next() -> None:
    mutex = Mutex()
    assert mutex.try_acquire()
    cancelled = asyncio.ensure_future(mutex.__aenter__())
    entered = asyncio.Event()

    async def next_one() -> None:
        async with mutex:
            entered.set()

    task = asyncio.ensure_future(next_one())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    mutex.release()
    await asyncio.wait_for(entered.wait(), 1)
    await task
    assert not mutex.locked() and not mutex._waiters


async def test_a_waiter_cancelled_once_woken_passes_the_turn_on() -> None:
    mutex = Mutex()
    assert mutex.try_acquire()
    woken = asyncio.ensure_future(mutex.__aenter__())
    entered = asyncio.Event()

    async def next_one() -> None:
        async with mutex:
            entered.set()

    task = asyncio.ensure_future(next_one())
    await asyncio.sleep(0)
    mutex.release()  # wakes the first waiter...
    woken.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await woken
    await asyncio.wait_for(entered.wait(), 1)
    await task
    assert not mutex.locked() and not mutex._waiters


async def test_acquire_waits_for_the_holder_then_takes_the_mutex() -> None:
    mutex = Mutex()
    assert mutex.try_acquire()
    entered = asyncio.Event()

    async def second() -> None:
        await mutex.acquire()
        entered.set()

    task = asyncio.create_task(second())
    await asyncio.sleep(0)
    assert not entered.is_set()
    mutex.release()
    await asyncio.wait_for(entered.wait(), 1)
    assert mutex.locked()
    assert not mutex.try_acquire()
    mutex.release()
    assert mutex.try_acquire()
    await task
