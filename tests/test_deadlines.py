"""Deadlines: one timer for many deadlines of one duration, never early, never cancelled ones."""

from __future__ import annotations

import asyncio

from minidasgi.deadlines import Deadlines


async def test_deadlines_fire_in_order_never_early_and_not_when_cancelled() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(0.05)
    fired: list[tuple[str, float]] = []
    start = loop.time()
    deadlines.add(lambda name: fired.append((name, loop.time())), "a")
    cancelled = deadlines.add(lambda name: fired.append((name, loop.time())), "b")
    await asyncio.sleep(0.01)
    deadlines.add(lambda name: fired.append((name, loop.time())), "c")
    Deadlines.cancel(cancelled)
    await asyncio.sleep(0.3)
    assert [name for name, _ in fired] == ["a", "c"]
    assert fired[0][1] - start >= 0.05 and fired[1][1] - start >= 0.06
    assert len(deadlines) == 0 and deadlines._timer is None  # idle: no timer left armed


async def test_one_timer_serves_many_deadlines() -> None:
    deadlines = Deadlines(10)
    entries = [deadlines.add(lambda _: None, i) for i in range(100)]
    timers = [h for h in asyncio.get_running_loop()._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
    assert sum(1 for h in timers if getattr(h, "_callback", None) == deadlines._fire) == 1
    for entry in entries:
        Deadlines.cancel(entry)


async def test_a_wake_up_drops_cancelled_entries_not_yet_due_and_arms_nothing_for_them() -> None:
    # A request's deadline is nearly always cancelled long before its time: the wake-up that
    # finds only such entries must leave no timer armed for them (else the process wakes
    # every _GRAIN for entries that do nothing).
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(10)
    fired: list[str] = []
    for name in "abc":
        Deadlines.cancel(deadlines.add(fired.append, name))
    deadlines._fire()  # the wake-up, as the loop would run it, long before any is due
    assert fired == [] and len(deadlines) == 0 and deadlines._timer is None
    # A live entry behind cancelled ones keeps the timer armed for it, and only for it.
    Deadlines.cancel(deadlines.add(fired.append, "d"))
    deadlines.add(fired.append, "e")
    deadlines._fire()
    assert fired == [] and len(deadlines) == 1 and deadlines._timer is not None
    timer = deadlines._timer
    assert timer.when() > loop.time() + 9


async def test_a_deadline_counts_from_the_time_its_caller_read() -> None:
    # A caller that has just read the loop's clock hands that time over: the deadline is
    # that time plus the duration, with no second read of the clock.
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(10)
    now = loop.time()
    given = deadlines.add(lambda _: None, "given", now)
    assert given[0] == now + 10
    read = deadlines.add(lambda _: None, "read")
    assert now + 10 <= read[0] <= loop.time() + 10
    Deadlines.cancel(given)
    Deadlines.cancel(read)
