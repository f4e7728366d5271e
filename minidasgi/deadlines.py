"""Deadlines of one fixed duration, for many requests, on one timer.

Owns a FIFO of ``(when, callback, argument)`` entries and a single ``TimerHandle`` armed for
the oldest. Every entry is set ``duration`` after the moment it is added, and the loop's clock
never goes back, so the FIFO is also the order of expiry: adding and cancelling cost O(1), and
firing pops only the entries due. A request pays for a small list instead of a ``TimerHandle``
pushed into (and cancelled out of) the loop's heap.

Most entries are cancelled long before their time (a request acked, or over): a wake-up drops
every cancelled entry at the head of the FIFO, due or not, and re-arms the timer for the first
live one only, or not at all. A process whose deadlines are all cancelled in time (the usual
case) is woken once per ``duration`` at most, not once per ``_GRAIN`` for entries that would do
nothing.

It must never call a cancelled entry, never call one early (late by up to ``_GRAIN``: one
wake-up serves all the deadlines due within it), and never keep a timer armed while it holds no
live entry (an idle process stops waking once the last deadline set has passed or was
cancelled).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Deadlines"]

_GRAIN = 0.05
"""Seconds a deadline may fire late, so that under load one wake-up serves many."""


class Deadlines:
    """``add(callback, argument)`` calls ``callback(argument)`` ``duration`` seconds later,
    unless the returned entry is passed to ``cancel`` first."""

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self._entries: deque[list[Any]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(
        self, callback: Callable[[Any], None], argument: Any, now: float | None = None
    ) -> list[Any]:
        """Set a deadline; return its entry (for ``cancel``). ``now``: the loop's time, if
        the caller has just read it, in this very callback (``loop.time()`` read again
        costs a call; an older time would set the entry out of its order of expiry)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        entry = [(loop.time() if now is None else now) + self.duration, callback, argument]
        self._entries.append(entry)
        if self._timer is None:
            self._timer = loop.call_at(entry[0] + _GRAIN, self._fire)
        return entry

    @staticmethod
    def cancel(entry: list[Any]) -> None:
        """Forget a deadline (it stays queued, inert, until the next wake-up drops it)."""
        entry[1] = entry[2] = None

    def reset(self) -> None:
        """Forget everything and the event loop (the loop they belonged to is gone)."""
        self._entries.clear()
        self._timer = None
        self._loop = None

    def __len__(self) -> int:
        return len(self._entries)

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        entries = self._entries
        while entries:
            when, callback, argument = entries[0]
            if callback is None:  # cancelled: dropped whenever it is, so never waited for
                entries.popleft()
            elif when <= now:
                entries.popleft()
                callback(argument)
            else:
                # The first live entry: every later one is due later (FIFO), and whatever
                # is cancelled meanwhile is dropped at that wake-up.
                if self._timer is not None:  # armed by a callback's add(), for a later one
                    self._timer.cancel()
                self._timer = loop.call_at(when + _GRAIN, self._fire)
                return
