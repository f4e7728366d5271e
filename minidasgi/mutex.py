"""A mutex: one task at a time in a section of a request (a message's pieces, in order).

Owns the flag and the waiters' futures. It behaves as ``asyncio.Lock`` (first come, first
served; a waiter cancelled after it was woken passes the turn on) but costs less when nobody
else holds it, which is nearly always: ``try_acquire`` and ``release`` take and give it back
with no coroutine at all, where ``async with`` on an ``asyncio.Lock`` runs four Python calls
(``__aenter__``, ``acquire``, ``__aexit__``, ``release``), two of them coroutines. A task that
finds it taken waits with ``async with``, with a future made for it alone.

It must be released by the task that took it (``async with``, or ``try_acquire`` then
``release`` in a ``finally``), in one event loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType

__all__ = ["Mutex"]


class Mutex:
    """``async with mutex:`` runs the block while no other task is inside one."""

    __slots__ = ("_locked", "_waiters")

    def __init__(self) -> None:
        self._locked = False
        self._waiters: deque[asyncio.Future[None]] | None = None  # made at the first wait

    def locked(self) -> bool:
        """True while a task is inside."""
        return self._locked

    def try_acquire(self) -> bool:
        """Take the mutex if nobody holds it or waits for it (then ``release`` it), without
        a coroutine: what a caller that is nearly always alone uses before ``async with``."""
        if self._locked or self._waiters:
            return False
        self._locked = True
        return True

    def release(self) -> None:
        """Give back the mutex taken with ``try_acquire``."""
        self._locked = False
        if self._waiters:  # nearly never: no call to wake nobody
            self._wake_first()

    async def acquire(self) -> None:
        """Wait for the mutex and take it (then ``release`` it): ``async with``'s entry, for
        a caller whose ``try_acquire`` failed."""
        if not self._locked and not self._waiters:
            self._locked = True  # the usual case: no future, no loop turn
            return
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = deque()
        waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            try:
                await waiter
            finally:
                waiters.remove(waiter)
        except asyncio.CancelledError:
            if not self._locked:  # woken, then cancelled: the next waiter's turn
                self._wake_first()
            raise
        self._locked = True

    __aenter__ = acquire

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._locked = False
        self._wake_first()

    def _wake_first(self) -> None:
        waiters = self._waiters
        if waiters:
            waiter = waiters[0]
            if not waiter.done():
                waiter.set_result(None)
