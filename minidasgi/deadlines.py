"""Deadlines of one fixed duration, for many requests, on one timer.

Owns a FIFO of ``(when, callback, argument)`` entries and a single ``TimerHandle`` armed for
the oldest. Every entry is set ``duration`` after the moment it is added, and the loop's clock
never goes back, so the FIFO is also the order of expiry: adding and cancelling cost O(1), and
firing pops only the entries due. A request pays for a small list instead of a ``TimerHandle``
pushed into (and cancelled out of) the loop's heap.

It must never call a cancelled entry, never call one early (late by up to ``_GRAIN``: one
wake-up serves all the deadlines due within it), and never keep a timer armed while it holds no
entry (an idle process stops waking once the last deadline set has passed).
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

    def add(self, callback: Callable[[Any], None], argument: Any) -> list[Any]:
        """Set a deadline; return its entry (for ``cancel``)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        entry = [loop.time() + self.duration, callback, argument]
        self._entries.append(entry)
        if self._timer is None:
            self._timer = loop.call_at(entry[0] + _GRAIN, self._fire)
        return entry

    @staticmethod
    def cancel(entry: list[Any]) -> None:
        """Forget a deadline (it stays queued, inert, until its time comes)."""
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
        while entries and entries[0][0] <= now:
            _, callback, argument = entries.popleft()
            if callback is not None:
                callback(argument)
        if entries:
            self._timer = loop.call_at(entries[0][0] + _GRAIN, self._fire)
