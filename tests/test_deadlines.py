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
